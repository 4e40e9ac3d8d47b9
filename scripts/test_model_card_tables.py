"""Tests of model_card_tables.py's --write and --check (standard library only; not run by CI):

    python3 -m unittest discover -s scripts -p 'test_*.py'
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_card_tables.py")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


class CardTables(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        root = self.dir.name
        self.judge = os.path.join(root, "judge")
        self.runs = os.path.join(root, "runs")
        os.makedirs(self.judge)
        os.makedirs(os.path.join(self.runs, "r1"))
        with open(os.path.join(self.judge, "judge.json"), "w") as f:
            json.dump({"features": ["a", "b"], "lambda": 0.001, "fitted_on": {
                "photos": "trainA", "photo_count": 10, "paintings": "trainB", "painting_count": 12},
                "cross_validation": {"folds": 5, "chosen_by": "lowest log-loss",
                                     "results": [{"lambda": 0.001, "log_loss": 0.2, "accuracy": 0.9}]}}, f)
        self.scores = [
            {"model": "identity", "direction": "photo2painting", "input": "testA", "n": 4,
             "called_painting": 0.25, "mean_probability": 0.2},
            {"model": "identity", "direction": "painting2photo", "input": "testB", "n": 5,
             "called_painting": 0.8, "mean_probability": 0.7},
        ]
        write_jsonl(os.path.join(self.judge, "scores.jsonl"), self.scores)
        write_jsonl(os.path.join(self.judge, "robustness.jsonl"), [])
        write_jsonl(os.path.join(self.runs, "r1", "losses.jsonl"), [
            {"step": s, "epoch": 0, "lr": 2e-4, "seconds": 2.0 * s, "G_total": 1.0, "gan_G": 0.5, "gan_F": 0.5,
             "cycle_x": 0.1, "cycle_y": 0.1, "identity_x": 0.05, "identity_y": 0.05, "D_X": 0.2, "D_Y": 0.2}
            for s in range(1, 301)])
        write_jsonl(os.path.join(self.runs, "r1", "eval.jsonl"), [
            {"step": 300, "images_x": 4, "images_y": 5, "cycle_x": 0.3, "cycle_y": 0.2,
             "identity_x": 0.25, "identity_y": 0.15}])
        self.card = os.path.join(root, "README.md")
        with open(self.card, "w") as f:
            f.write("# card\n<!-- BEGIN generated: judge -->\nold\n<!-- END generated: judge -->\nprose\n"
                    "<!-- BEGIN generated: run r1 -->\n<!-- END generated: run r1 -->\nend\n")

    def tearDown(self):
        self.dir.cleanup()

    def tables(self, *args):
        return subprocess.run([sys.executable, SCRIPT, "--judge-dir", self.judge, "--runs-dir", self.runs, *args],
                              capture_output=True, text=True)

    def test_write_then_check_passes_and_keeps_the_prose(self):
        self.assertEqual(self.tables("--check", self.card).returncode, 1, "the placeholder section is stale")
        self.assertEqual(self.tables("--write", self.card).returncode, 0)
        self.assertEqual(self.tables("--check", self.card).returncode, 0)
        with open(self.card) as f:
            text = f.read()
        self.assertTrue(text.startswith("# card\n") and "\nprose\n" in text and text.endswith("\nend\n"))
        self.assertIn("| identity (untranslated) | 0.25 (1/4) | 0.20 | 0.80 (4/5) | 0.70 |", text)
        self.assertIn("| **51–300 (last)** |", text)
        self.assertIn("| 300 | 2e-4 | 0.300 | 0.200 | 0.250 | 0.150 |", text)

    def test_check_fails_when_a_committed_number_changes(self):
        self.tables("--write", self.card)
        self.scores.append({"model": "new", "direction": "photo2painting", "input": "testA", "n": 4,
                            "called_painting": 0.75, "mean_probability": 0.6})
        write_jsonl(os.path.join(self.judge, "scores.jsonl"), self.scores)
        checked = self.tables("--check", self.card)
        self.assertEqual(checked.returncode, 1)
        self.assertIn("+| new | 0.75 (3/4) | 0.60 | – | – |", checked.stderr)

    def test_a_section_without_markers_is_an_error(self):
        with open(self.card, "w") as f:
            f.write("<!-- BEGIN generated: judge -->\n<!-- END generated: judge -->\n")
        written = self.tables("--write", self.card)
        self.assertEqual(written.returncode, 1)
        self.assertIn("no section for 'run r1'", written.stderr)

    def test_the_choice_follows_the_training_images_not_the_held_out_ones(self):
        def rows(name, train, test):
            return [{"model": name, "direction": "photo2painting", "input": "trainA-every-10th", "n": 10,
                     "called_painting": train, "mean_probability": train},
                    {"model": name, "direction": "photo2painting", "input": "testA", "n": 4,
                     "called_painting": test, "mean_probability": test}]
        write_jsonl(os.path.join(self.judge, "selection.jsonl"),
                    rows("step 1", 0.5, 1.0) + rows("step 2", 0.7, 0.25) + rows("step 3", 0.7, 0.5))
        with open(self.card, "a") as f:
            f.write("<!-- BEGIN generated: selection -->\n<!-- END generated: selection -->\n")
        self.assertEqual(self.tables("--write", self.card).returncode, 0)
        with open(self.card) as f:
            text = f.read()
        # step 2 and 3 tie on the training photos: the later one is chosen, whatever held-out says
        self.assertIn("| **step 3 (chosen)** | **0.70 (7/10)** | **0.70** | **–** | **–** | **0.50 (2/4)** |", text)
        self.assertIn("| step 1 | 0.50 (5/10) | 0.50 | – | – | 1.00 (4/4) | 1.00 | – | – |", text)


class LearningRates(unittest.TestCase):
    def test_a_decaying_schedule_keeps_two_significant_digits(self):
        sys.path.insert(0, os.path.dirname(SCRIPT))
        from model_card_tables import lr_text
        self.assertEqual([lr_text(lr) for lr in (2e-4, 1.5e-4, 2e-4 / 3, None)], ["2e-4", "1.5e-4", "6.7e-5", "–"])


if __name__ == "__main__":
    unittest.main()
