"""report.html: self-contained, an index with status and time, one section per step with reading/metrics/figures."""

from __future__ import annotations

import base64
import json
import re

from mamba_interp.pipeline.report import build_report, flatten, write_report

# a valid 1x1 PNG
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def _fake_run(tmp_path):
    out = tmp_path / "run"
    (out / "step_00_setup").mkdir(parents=True)
    (out / "step_02_activations").mkdir()
    (out / "step_05_circuits").mkdir()
    (out / "step_07_stale").mkdir()
    (out / "step_02_activations" / "stats_heatmap.png").write_bytes(PNG)
    results = {
        "step_00_setup": {"step": 0, "name": "setup", "title": "Setup", "status": "completed", "duration_s": 0.5,
                          "metrics": {"hooks": 34, "model": {"arch": "mamba1"}}, "artifacts": [],
                          "reading": "All 34 hook points fired <ok>."},
        "step_02_activations": {"step": 2, "name": "activations", "status": "completed", "duration_s": 3.25,
                                "metrics": {"stats": {"0": {"x": {"kurtosis": 2.5, "outlier_dims": list(range(20))}}}},
                                "artifacts": ["stats_heatmap.png", "stats.safetensors"], "reading": "Heavy tails.",
                                "fallbacks": [{"action": "cpu", "batch_size": 8, "device": "cpu"}]},
        "step_05_circuits": {"step": 5, "name": "circuits", "status": "failed", "duration_s": 0.1, "metrics": {},
                             "artifacts": [], "reading": "",
                             "error": {"type": "ValueError", "message": "planted", "traceback": "Traceback ..."}},
        "step_07_stale": {"step": 7, "name": "stale", "status": "completed", "metrics": {}, "artifacts": [],
                          "reading": "from an older run"},
    }
    for folder, res in results.items():
        (out / folder / "result.json").write_text(json.dumps(res))
    manifest = {
        "status": "completed_with_failures", "seed": 3, "dtype": "float32", "layers": [0, 1],
        "model": {"name": "tiny", "spec": "tiny", "arch": "mamba1", "n_layer": 2, "fingerprint": "abc"},
        "device": {"name": "cpu"}, "versions": {"torch": "2.x"}, "config": {"samples": 4},
        "steps": [
            {"step": 0, "name": "setup", "status": "completed", "duration_s": 0.5, "folder": "step_00_setup"},
            {"step": 2, "name": "activations", "status": "completed", "duration_s": 3.25, "resumed": True,
             "folder": "step_02_activations"},
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
    index = text[text.index("<h2>Steps</h2>"):text.index("</table>")]
    for needle in ("setup", "activations", "circuits", "causality", "3.2 s", "resumed", "requires step 5"):
        assert needle in index, needle
    assert index.count('class="status failed"') == 1 and index.count('class="status skipped"') == 1
    # sections: reading (escaped), metrics, error, fallback; a stale folder of another run is left out
    assert "All 34 hook points fired &lt;ok&gt;." in text and "stats.0.x.kurtosis" in text
    assert "Failed with ValueError: planted" in text and "out-of-memory fallback: cpu" in text
    assert "from an older run" not in text and 'id="step-7"' not in text
    assert "(20)" in text  # long lists are shortened with their length


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
    index = text[text.index("<h2>Steps</h2>"):text.index("</table>")]
    assert index.count('class="status unreadable"') == 1  # step 2; step 5 is listed with the manifest's status
    assert "Not shown: result.json could not be read (JSONDecodeError" in text
    assert "Not shown: result.json could not be shown (ValueError" in text  # step 5's duration is not a number
    assert "All 34 hook points fired" in text and "stats_heatmap.png could not be read" in text
    (out / "manifest.json").write_text("[1, 2]")
    text = build_report(out)
    assert "manifest.json holds a list, not a JSON object" in text and 'id="step-7"' in text
