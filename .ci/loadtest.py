#!/usr/bin/env python3
"""Load and memory test of a running cycleserve: many clients, mixed and hostile images.

    loadtest.py mixed URL PID BUDGET_BYTES [--clients 64] [--seconds 60]
    loadtest.py burst URL PID [--clients 32] [--side 1024]

`mixed`: CLIENTS threads (each waiting a second after a 503, as Retry-After says) send for SECONDS a mix of 256², 1024², 2048² and 4096×64 PNG and JPEG
photos plus hostile files (a 16,777,216 × 1 PNG, a PNG whose ICC profile inflates to 512 MiB,
a JPEG declaring 65,500², a GIF frame larger than its screen, a TIFF strip claiming 1 GiB).
Every answer must be 200, 413, 422 (hostile files only), 503 or 504, errors with the JSON body;
the server's peak RSS (VmHWM) must stay under BUDGET + 300 MB and /readyz must answer 200 after.

`burst`: CLIENTS simultaneous photos of SIDE² must all come back 200 (queued, never refused).

Both print a summary (requests by status, latency percentiles, peak RSS) and exit non-zero on
any violation. Only the standard library and Pillow are used; traffic goes to loopback only.
"""
import argparse
import http.client
import io
import json
import struct
import sys
import threading
import time
import urllib.parse
import zlib

from PIL import Image

MB = 1_000_000
ALLOWED = {200, 413, 503, 504}


def photo(width, height, fmt):
    """A smooth, photo-like test image (gradients and rings), encoded as PNG or JPEG."""
    img = Image.radial_gradient("L").resize((width, height))
    rgb = Image.merge("RGB", (img, Image.linear_gradient("L").resize((width, height)), img.transpose(0)))
    out = io.BytesIO()
    rgb.save(out, fmt, quality=90) if fmt == "JPEG" else rgb.save(out, fmt)
    return out.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def iccp_bomb():
    comp = zlib.compressobj(9)
    block = bytes(1 << 20)
    profile = b"".join(comp.compress(block) for _ in range(512)) + comp.flush()
    pixel = zlib.compress(bytes([0, 10, 20, 30]))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + png_chunk(b"iCCP", b"bomb\0\0" + profile) + png_chunk(b"IDAT", pixel) + png_chunk(b"IEND", b""))


def one_pixel_tall():
    out = io.BytesIO()
    Image.new("L", (1 << 24, 1)).save(out, "PNG")
    return out.getvalue()


def jpeg_huge_declared():
    jpeg = bytearray(photo(16, 16, "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = b"\xff\xdc\xff\xdc"
    return bytes(jpeg)


def gif_frame_larger_than_screen():
    return (b"GIF89a" + bytes([1, 0, 1, 0, 0x80, 0, 0, 0, 0, 0, 255, 255, 255, 0x2C, 0, 0, 0, 0])
            + struct.pack("<HH", 20000, 20000) + bytes([0, 2, 2, 0x4C, 0x01, 0, 0x3B]))


def tiff_huge_strip():
    entries = [(256, 3, 1, 16), (257, 3, 1, 16), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8), (277, 3, 1, 3), (278, 3, 1, 16), (279, 4, 1, 1 << 30)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes([7]) * (16 * 16 * 3)


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


class Client:
    def __init__(self, base):
        url = urllib.parse.urlsplit(base)
        assert url.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
        self.host, self.port = url.hostname, url.port

    def post(self, body, timeout=600):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            started = time.monotonic()
            conn.request("POST", "/translate?direction=x2y", body, {"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheader("Content-Type", ""), data, time.monotonic() - started
        finally:
            conn.close()

    def get(self, path):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def check_error(status, ctype, data):
    if status == 200:
        return None
    if not ctype.startswith("application/json"):
        return f"{status} without a JSON body"
    try:
        json.loads(data)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"{status} with a malformed error body: {data[:200]!r}"
    return None


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


def mixed(args):
    client = Client(args.url)
    photos = [(f"{w}x{h} {fmt}", photo(w, h, fmt)) for (w, h) in [(256, 256), (1024, 1024), (2048, 2048), (4096, 64)]
              for fmt in ("PNG", "JPEG")]
    # Under load a hostile file may also be told to come back (503) or wait past its deadline
    # (504) behind the photos ahead of it; it must never be served, bar the ICC bomb, whose
    # pixels are fine once the profile is dropped.
    busy = {503, 504}
    hostile = [("16777216x1 PNG", one_pixel_tall(), {413} | busy), ("iCCP bomb", iccp_bomb(), {200, 413} | busy),
               ("JPEG 65500²", jpeg_huge_declared(), {413} | busy),
               ("GIF frame > screen", gif_frame_larger_than_screen(), {413, 422} | busy),
               ("TIFF 1 GiB strip", tiff_huge_strip(), {413, 422} | busy)]
    plan = [(name, body, ALLOWED) for name, body in photos] + hostile
    results, problems, lock = [], [], threading.Lock()
    deadline = time.monotonic() + args.seconds

    def worker(index):
        i = index
        while time.monotonic() < deadline:
            name, body, allowed = plan[i % len(plan)]
            i += 1
            try:
                status, ctype, data, took = client.post(body)
            except OSError as err:
                with lock:
                    problems.append(f"{name}: connection failed: {err}")
                continue
            problem = check_error(status, ctype, data)
            if status not in allowed:
                problem = f"{name}: status {status} not in {sorted(allowed)}: {data[:200]!r}"
            with lock:
                results.append((name, status, took))
                if problem:
                    problems.append(problem)
            if status == 503:
                # As a well-behaved client does: wait as Retry-After says.
                time.sleep(1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = vm_hwm(args.pid)
    ready, _ = client.get("/readyz")
    by_status = {}
    for _, status, _ in results:
        by_status[status] = by_status.get(status, 0) + 1
    latencies = [took for _, status, took in results if status == 200]
    summary = {
        "requests": len(results), "by_status": dict(sorted(by_status.items())),
        "p50_ms_ok": round(1000 * percentile(latencies, 50)), "p99_ms_ok": round(1000 * percentile(latencies, 99)),
        "peak_rss_mb": round(peak / MB), "budget_mb": round(args.budget / MB), "readyz": ready,
    }
    print(json.dumps(summary))
    if peak > args.budget + 300 * MB:
        problems.append(f"peak RSS {peak / MB:.0f} MB over budget + 300 MB ({(args.budget + 300 * MB) / MB:.0f})")
    if ready != 200:
        problems.append(f"/readyz answered {ready} after the load")
    if not by_status.get(200):
        problems.append("no request succeeded")
    return problems


def burst(args):
    client = Client(args.url)
    body = photo(args.side, args.side, "JPEG")
    results, lock = [], threading.Lock()

    def worker():
        try:
            status, ctype, data, took = client.post(body)
        except OSError as err:
            status, took, data = f"connection failed: {err}", 0.0, b""
        with lock:
            results.append((status, took, data[:200]))

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = vm_hwm(args.pid)
    latencies = [took for status, took, _ in results if status == 200]
    print(json.dumps({"requests": len(results), "ok": len(latencies), "p50_ms": round(1000 * percentile(latencies, 50)),
                      "max_ms": round(1000 * max(latencies, default=0)), "peak_rss_mb": round(peak / MB)}))
    return [f"burst request answered {status}: {data!r}" for status, _, data in results if status != 200]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["mixed", "burst"])
    parser.add_argument("url")
    parser.add_argument("pid", type=int)
    parser.add_argument("budget", type=int, nargs="?", default=0)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args()
    if args.mode == "mixed":
        args.clients = args.clients or 64
        problems = mixed(args)
    else:
        args.clients = args.clients or 32
        problems = burst(args)
    for problem in problems[:20]:
        print("FAIL:", problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
