"""report.html: self-contained, a summary (notices, one finding per step), an index with status and time, one section
per step with reading/figures/dashboards/metrics; long tables fold, wide ones scroll; checked in a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mamba_interp.pipeline.report import COLLAPSE_ROWS, build_report, first_sentence, flatten, write_report

# a valid 1x1 PNG
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


CARD = {
    "sae": "L0_x", "hook_name": "blocks.0.mixer.hook_x", "latent": 131,
    "reasons": ["best latent for token=12 (r = 1.00)"],
    "density": 0.08, "max_activation": 2.5, "mean_activation": 1.2, "attribution": -0.5,
    "histogram": {"edges": [0.0, 1.0, 2.0, 2.5], "counts": [3, 9, 4]},
    "contexts": [{"sequence": 4, "position": 9, "activation": 2.5, "tokens": ["3", "<12>", " Mary"],
                  "acts": [0.0, 2.5, 0.4], "focus": 1}],
    "logit_effect": {"kind": "ablation", "note": "measured", "promoted": [["12", 1.1]], "suppressed": [["6", -0.7]]},
    "variable": {"name": "token=12", "r": 0.997, "shuffled_best_abs_r": 0.03},
    "ablation": {"value": 0.069, "ci": [0.014, 0.143], "n": 64},
}


def _fake_run(tmp_path):
    out = tmp_path / "run"
    (out / "step_00_setup").mkdir(parents=True)
    (out / "step_01_tasks").mkdir()
    (out / "step_02_activations").mkdir()
    (out / "step_03_sae").mkdir()
    (out / "step_05_circuits").mkdir()
    (out / "step_07_stale").mkdir()
    (out / "step_02_activations" / "stats_heatmap.png").write_bytes(PNG)
    results = {
        "step_00_setup": {"step": 0, "name": "setup", "title": "Setup", "status": "completed", "duration_s": 0.5,
                          "metrics": {"hooks": 34, "model": {"arch": "mamba1"}}, "artifacts": [],
                          "reading": "All 34 hook points fired <ok>."},
        "step_01_tasks": {"step": 1, "name": "tasks", "status": "completed", "duration_s": 0.2, "artifacts": [],
                          "metrics": {"chance_warning": "the model is at chance on every prompt set", "accuracy": 0.1},
                          "reading": "8 prompts. The model is at chance."},
        "step_02_activations": {"step": 2, "name": "activations", "status": "completed", "duration_s": 3.25,
                                "metrics": {"stats": {"0": {"x": {"kurtosis": 2.5, "outlier_dims": list(range(20))}}}},
                                "artifacts": ["stats_heatmap.png", "stats.safetensors"], "reading": "Heavy tails.",
                                "fallbacks": [{"action": "cpu", "batch_size": 8, "device": "cpu"}]},
        "step_03_sae": {"step": 3, "name": "sae", "status": "completed", "duration_s": 2.0,
                        "artifacts": ["feature_dashboards.json"], "reading": "2 SAEs with FVU 0.01. More text.",
                        "metrics": {"warnings": ["L0_y: 67% of its 512 latents never fire"],
                                    "saes": {f"L{i}_x": {f"col_{j}": j * 1.5 for j in range(30)} for i in range(25)}}},
        "step_05_circuits": {"step": 5, "name": "circuits", "status": "failed", "duration_s": 0.1, "metrics": {},
                             "artifacts": [], "reading": "",
                             "error": {"type": "ValueError", "message": "planted", "traceback": "Traceback ..."}},
        "step_07_stale": {"step": 7, "name": "stale", "status": "completed", "metrics": {}, "artifacts": [],
                          "reading": "from an older run"},
    }
    for folder, res in results.items():
        (out / folder / "result.json").write_text(json.dumps(res))
    (out / "step_03_sae" / "feature_dashboards.json").write_text(json.dumps([CARD]))
    manifest = {
        "status": "completed_with_failures", "seed": 3, "dtype": "float32", "layers": [0, 1],
        "model": {"name": "tiny", "spec": "tiny", "arch": "mamba1", "n_layer": 2, "fingerprint": "abc"},
        "device": {"name": "cpu"}, "versions": {"torch": "2.x"}, "config": {"samples": 4},
        "steps": [
            {"step": 0, "name": "setup", "status": "completed", "duration_s": 0.5, "folder": "step_00_setup"},
            {"step": 1, "name": "tasks", "status": "completed", "duration_s": 0.2, "folder": "step_01_tasks"},
            {"step": 2, "name": "activations", "status": "completed", "duration_s": 3.25, "resumed": True,
             "folder": "step_02_activations"},
            {"step": 3, "name": "sae", "status": "completed", "duration_s": 2.0, "folder": "step_03_sae"},
            {"step": 5, "name": "circuits", "status": "failed", "duration_s": 0.1, "folder": "step_05_circuits",
             "reason": "ValueError: planted"},
            {"step": 6, "name": "causality", "status": "skipped", "duration_s": 0.0, "folder": "step_06_causality",
             "reason": "requires step 5 (circuits), which failed"},
        ],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_report_is_self_contained_with_index_sections_and_figures(tmp_path):
    out = _fake_run(tmp_path)
    path = write_report(out)
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # figures are embedded, nothing is loaded from elsewhere
    assert f"data:image/png;base64,{base64.b64encode(PNG).decode()}" in text
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    # index: every step of the manifest with status, time and note
    index = text[text.index("<h2>Steps</h2>"):text.index("</table>", text.index("<h2>Steps</h2>"))]
    for needle in ("setup", "activations", "circuits", "causality", "3.2 s", "resumed", "requires step 5"):
        assert needle in index, needle
    assert index.count('class="status failed"') == 1 and index.count('class="status skipped"') == 1
    # the summary comes first: notices (failure, chance, a step's warnings), then one finding per completed step
    summary = text[text.index('<section id="summary">'):text.index("<h2>Steps</h2>")]
    assert "step 5 (circuits) failed: ValueError: planted" in summary
    assert "step 1 (tasks): the model is at chance on every prompt set" in summary
    assert "step 3 (sae): L0_y: 67% of its 512 latents never fire" in summary
    assert "Step 3 sae</a>: 2 SAEs with FVU 0.01." in summary and "More text" not in summary
    assert summary.count("<li><a href=") == 4  # steps 0, 1, 2, 3 (5 failed, 6 skipped)
    # sections: reading (escaped), metrics, error, fallback; a stale folder of another run is left out
    assert "All 34 hook points fired &lt;ok&gt;." in text and "stats.0.x.kurtosis" in text
    assert "Failed with ValueError: planted" in text and "out-of-memory fallback: cpu" in text
    assert "from an older run" not in text and 'id="step-7"' not in text
    assert "(20)" in text  # long lists are shortened with their length
    # long tables fold, every table scrolls sideways inside its section, the dashboard card is there
    saes = text[text.index("<h3>saes</h3>"):]
    assert saes.index("<details><summary>25 rows of saes") < saes.index("<table>") and COLLAPSE_ROWS < 25
    assert text.count('<div class="scroll"><table>') == text.count("<table>") - 1  # all but the step index
    assert 'data-latent="131"' in text and "token=12" in text and "+0.0690 nats [95% CI +0.0140, +0.1430]" in text
    assert "&lt;12&gt;" in text and "rgba(230,126,34,1.00)" in text  # tokens escaped and shaded by activation


def test_broken_dashboards_file_costs_only_its_cards(tmp_path):
    out = _fake_run(tmp_path)
    (out / "step_03_sae" / "feature_dashboards.json").write_text("{not json")
    text = build_report(out)
    assert "feature_dashboards.json could not be shown (JSONDecodeError)" in text and "Step 5" in text


def test_first_sentence():
    assert first_sentence("FVU is 0.011–0.082, e.g. fine. Then more.") == "FVU is 0.011–0.082, e.g. fine."
    assert first_sentence("x" * 400).endswith("…") and len(first_sentence("x" * 400)) == 280


def test_report_without_manifest_lists_what_is_on_disk(tmp_path):
    out = _fake_run(tmp_path)
    (out / "manifest.json").unlink()
    text = build_report(out)
    assert 'id="step-7"' in text and 'id="step-0"' in text


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == [("a.b", 1), ("a.c.d", [1, 2]), ("e", {})]


def test_broken_files_are_shown_as_such_and_never_stop_the_report(tmp_path):
    out = _fake_run(tmp_path)
    (out / "step_02_activations" / "result.json").write_text('{"step": 2, "status": "compl')  # cut off
    (out / "step_07_stale" / "result.json").write_bytes(b"\xff\xfe not text")  # not even in the manifest
    bad = json.loads((out / "step_05_circuits" / "result.json").read_text())
    (out / "step_05_circuits" / "result.json").write_text(json.dumps({**bad, "duration_s": "slow"}))
    (out / "step_00_setup" / "stats_heatmap.png").mkdir()  # an artifact that cannot be read
    setup = json.loads((out / "step_00_setup" / "result.json").read_text())
    (out / "step_00_setup" / "result.json").write_text(json.dumps({**setup, "artifacts": ["stats_heatmap.png"]}))
    text = write_report(out).read_text()
    index = text[text.index("<h2>Steps</h2>"):text.index("</table>", text.index("<h2>Steps</h2>"))]
    assert index.count('class="status unreadable"') == 1  # step 2; step 5 is listed with the manifest's status
    assert "Not shown: result.json could not be read (JSONDecodeError" in text
    assert "Not shown: result.json could not be shown (ValueError" in text  # step 5's duration is not a number
    assert "All 34 hook points fired" in text and "stats_heatmap.png could not be read" in text
    (out / "manifest.json").write_text("[1, 2]")
    text = build_report(out)
    assert "manifest.json holds a list, not a JSON object" in text and 'id="step-7"' in text


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and Path(p).is_file()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium at /usr/bin/chromium (apt-get install chromium)")
def test_report_in_a_real_browser(tmp_path):
    """Headless Chromium loads the page (no network), builds the DOM with the summary and a dashboard card, and
    renders a screenshot."""
    out = _fake_run(tmp_path)
    page = write_report(out).as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    run = subprocess.run([*flags, "--dump-dom", f"--screenshot={shot}", "--window-size=1280,2000", page],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    assert '<section id="summary">' in dom and "Findings" in dom and "the model is at chance" in dom
    assert dom.count('class="dash-card"') == 1 and "<svg" in dom and 'class="dash-tok dash-focus"' in dom
    assert shot.stat().st_size > 20_000
