#!/usr/bin/env python3
"""Prints the ENV of a Dockerfile's last stage as KEY=VALUE lines, for .ci/run to start the
release binary exactly as the image would. Usage: container_env.py Dockerfile [MODELS_DIR]"""
import shlex
import sys

lines, current = [], ""
for raw in open(sys.argv[1]):
    current += raw.rstrip("\n")
    if current.endswith("\\"):
        current = current[:-1] + " "
        continue
    lines.append(current.strip())
    current = ""
last_stage = max(i for i, l in enumerate(lines) if l.upper().startswith("FROM "))
for line in lines[last_stage:]:
    if line.upper().startswith("ENV "):
        for pair in shlex.split(line[4:]):
            key, value = pair.split("=", 1)
            if key == "CYCLESERVE_MODELS_DIR" and len(sys.argv) > 2:
                value = sys.argv[2]
            print(f"{key}={value}")
