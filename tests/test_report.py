"""The HTML report of RL runs (finpercep.eval.report): self-contained, tables and images present,
text escaped, clear errors; and rendered in a real headless Chromium (images decode, rows render)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finpercep.eval.report import load_run, render_report, stage_spans

BROWSER_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------
# Tiny run folders, written by hand in the format of finpercep.rl.common


def _grid(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_run(root: Path, *, algo: str, reward: str, metrics: list[dict], eval_json: dict | None = None,
             sample_steps: tuple[int, ...] = (1,), grid: tuple[int, int] = (36, 148)) -> Path:
    """A run folder: run_config.json, metrics.jsonl, samples/step_XXXXXXX.png, optional eval.json."""
    root.mkdir(parents=True)
    meta = {"algo": algo, "policy": "tiny-x4", "reward": reward, "data": "runs/fgr-train",
            "config": {"run": {"steps": 6, "batch": 2, "crop": 32, "lr": 1e-4, "lora_rank": 0, "seed": 0}}}
    (root / "run_config.json").write_text(json.dumps(meta))
    (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for s in sample_steps:
        (root / "samples").mkdir(exist_ok=True)
        _grid(*grid, seed=s).save(root / "samples" / f"step_{s:07d}.png")
    if eval_json is not None:
        (root / "eval.json").write_text(json.dumps(eval_json))
    return root


def metrics_with_stages(n: int = 6) -> list[dict]:
    stages = [0, 0, 0, 1, 1, 2][:n]
    return [{"step": i + 1, "reward/mean": 0.1 * i, "reward/std": 0.05, "fidelity/l1": 0.03 - 0.001 * i,
             "kl": 0.01 * i, "loss": 1.0 / (i + 1), "grad_norm": 0.5, "time/step": 0.2,
             "curriculum/stage": stages[i]} for i in range(n)]


EVAL_BEFORE_AFTER = {"before": {"psnr": 24.0, "ssim": 0.70, "niqe": 5.5},
                     "after": {"psnr": 24.5, "ssim": 0.72, "niqe": 5.1}}
EVAL_FLAT = {"psnr": 23.5, "ssim": 0.69, "niqe": 4.8}


@pytest.fixture()
def two_runs(tmp_path: Path) -> list[Path]:
    a = make_run(tmp_path / "refl-run", algo="refl", reward="finpercep", metrics=metrics_with_stages(),
                 eval_json=EVAL_BEFORE_AFTER, sample_steps=(1, 2, 4, 6))
    b = make_run(tmp_path / "grpo-run", algo="grpo", reward="<b>toy</b> & co",
                 metrics=[{"step": i + 1, "reward/mean": 0.05 * i, "reward/std": 0.02} for i in range(4)],
                 eval_json=EVAL_FLAT, sample_steps=(3,))
    return [a, b]


class Page(HTMLParser):
    """Tags of an HTML page: every (tag, attrs), the text of each body row's first cell."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[str] = []
        self._in_tbody = self._first_cell = False
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self._first_cell = True
        elif tag == "td" and self._first_cell:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_tbody = False
        elif tag == "td" and self._cell is not None:
            self.rows.append("".join(self._cell).strip())
            self._cell, self._first_cell = None, False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def imgs(self) -> list[dict]:
        return [a for t, a in self.tags if t == "img"]


def decode_data_uri(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    im = Image.open(io.BytesIO(base64.b64decode(data)))
    im.load()
    return im


# ---------------------------------------------------------------------------------------------
# The page itself


def test_report_is_self_contained_with_tables_and_inlined_images(two_runs, tmp_path):
    out = render_report(two_runs, tmp_path / "out" / "report.html", num_samples=3)
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    # nothing outside the file: no external src/href, no stylesheet or script file
    for tag, attrs in page.tags:
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/"), (tag, attrs["src"][:80])
        if "href" in attrs:
            assert attrs["href"].startswith("#"), (tag, attrs["href"])  # only in-page anchors
        assert tag not in ("link", "script", "iframe"), tag
    assert "http://" not in text and "https://" not in text
    # images: 1 overlaid reward figure + 2 curve figures + 3 latest samples of run a + 1 of run b
    imgs = page.imgs()
    assert len(imgs) == 1 + 2 + 3 + 1
    for a in imgs:
        assert decode_data_uri(a["src"]).size[0] > 0
        assert a["alt"]
    captions = text.count("Step ")
    assert captions >= 4 and "Step 6:" in text and "Step 1:" not in text  # the latest three of four
    # table rows: comparison (one per run), run a's before/after eval, run b's flat eval
    assert page.rows[:2] == ["refl-run", "grpo-run"]
    assert page.rows[2:5] == ["psnr ↑", "ssim ↑", "niqe ↓"] and page.rows[5:8] == ["psnr ↑", "ssim ↑", "niqe ↓"]
    assert len(page.rows) == 8
    # the before/after table has both groups as columns; the comparison uses the "after" group
    assert "<th>before</th><th>after</th>" in text
    assert "<td><b>4.8</b></td>" in text  # best niqe (lower is better) of the two runs, in bold
    assert "<td><b>24.5</b></td>" in text  # best psnr: run a's after
    assert "curriculum stages" in text
    assert "<details>" in text and "run_config.json" in text
    # a few runs stay small
    assert out.stat().st_size < 2_000_000


def test_report_escapes_text_from_files(two_runs, tmp_path):
    text = render_report(two_runs, tmp_path / "r.html", title="a <script>title</script>").read_text()
    assert "<b>toy</b>" not in text and "&lt;b&gt;toy&lt;/b&gt; &amp; co" in text
    assert "<script>" not in text and "&lt;script&gt;title" in text


def test_render_is_deterministic(two_runs, tmp_path):
    a = render_report(two_runs, tmp_path / "a.html").read_bytes()
    b = render_report(two_runs, tmp_path / "b.html").read_bytes()
    assert a == b


def test_sample_grids_are_downscaled_to_max_width(tmp_path):
    run = make_run(tmp_path / "big", algo="refl", reward="finpercep", metrics=metrics_with_stages(2),
                   sample_steps=(5,), grid=(300, 900))
    text = render_report([run], tmp_path / "r.html", max_image_width=200).read_text()
    sample = [a for a in Page(text).imgs() if a.get("class") == "sample"]
    assert len(sample) == 1
    im = decode_data_uri(sample[0]["src"])
    assert im.size == (200, round(300 * 200 / 900)) and im.format == "JPEG"


def test_single_run_without_eval_shows_last_logged_metrics(tmp_path):
    run = make_run(tmp_path / "r", algo="dpo", reward="finpercep", metrics=metrics_with_stages(3), sample_steps=())
    text = render_report([run], tmp_path / "r.html").read_text()
    assert "Last logged metrics (step 3)" in text
    rows = Page(text).rows
    assert "curriculum/stage" in rows and "kl" in rows and "time/step" in rows
    assert 'id="compare"' not in text  # one run: no comparison section
    assert "No sample grids" in text


def test_empty_metrics_and_a_cut_off_line_are_reported(tmp_path):
    empty = make_run(tmp_path / "empty", algo="refl", reward="finpercep", metrics=[], sample_steps=())
    text = render_report([empty], tmp_path / "e.html").read_text()
    assert "No metrics logged yet" in text
    assert not Page(text).imgs()
    cut = make_run(tmp_path / "cut", algo="refl", reward="finpercep", metrics=metrics_with_stages(2), sample_steps=())
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')
    assert len(load_run(cut).metrics) == 2 and load_run(cut).bad_lines == 1
    text = render_report([cut, empty], tmp_path / "c.html").read_text()
    assert "1 line(s) of metrics.jsonl" in text and "No metrics logged yet" in text


def test_errors_name_the_problem(tmp_path, two_runs):
    not_run = tmp_path / "photos"
    not_run.mkdir()
    with pytest.raises(ValueError, match="photos is not a run folder"):
        render_report([two_runs[0], not_run], tmp_path / "r.html")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        render_report([tmp_path / "nowhere"], tmp_path / "r.html")
    with pytest.raises(ValueError, match="no run folders"):
        render_report([], tmp_path / "r.html")
    with pytest.raises(ValueError, match="is a folder"):
        render_report(two_runs, tmp_path)
    (two_runs[1] / "eval.json").write_text("{not json")
    with pytest.raises(ValueError, match="eval.json: not valid JSON"):
        render_report(two_runs, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_stage_spans_cover_each_stage():
    spans = stage_spans(metrics_with_stages())
    assert spans == [(1.0, 4.0, 0), (4.0, 6.0, 1), (6.0, 6.0, 2)]
    assert stage_spans([{"step": 1, "reward/mean": 0.0}]) == []


def test_report_of_a_real_rl_run(tmp_path):
    """A run written by the ReFL loop itself (tiny policy, toy reward, 2 steps) renders."""
    import skimage.data as sd
    import torch

    from finpercep.policies.tiny import TinyConfig, TinySR
    from finpercep.rl import ALGORITHMS, RLConfig
    from finpercep.rl.common import PairData, RunConfig, run_meta
    from finpercep.types import RewardOutput

    data = tmp_path / "pairs"
    (data / "samples").mkdir(parents=True)
    lines = []
    for i, name in enumerate(("astronaut", "chelsea")):
        hr = Image.fromarray(getattr(sd, name)()[40:72, 60:92])
        hr.save(data / "samples" / f"{i}_hr.png")
        hr.resize((8, 8), Image.BICUBIC).save(data / "samples" / f"{i}_lr.png")
        lines.append(json.dumps({"id": f"s{i}", "hr": f"samples/{i}_hr.png", "lr": f"samples/{i}_lr.png"}))
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (data / "dataset.json").write_text(json.dumps({"config": {"scale": 4}}))

    class Grey:
        name, needs_reference, differentiable, range, has_map = "grey", False, True, (-1.0, 0.0), True

        def __call__(self, sr, lr=None, hr=None):
            d = (sr - 0.5).abs().mean(1, keepdim=True)
            return RewardOutput(score=-d.flatten(1).mean(1), map=d.clamp(0, 1))

        def to(self, device):
            return self

    torch.manual_seed(0)
    cfg = RunConfig(steps=2, batch=2, crop=16, learning_rate=1e-2, sample_every=1, ckpt_every=2)
    run = tmp_path / "refl"
    ALGORITHMS["refl"](TinySR(TinyConfig(channels=8, num_layers=1)), Grey(), PairData(data), run, cfg,
                       RLConfig().refl, meta=run_meta("refl", "tiny", "grey", data, cfg), progress=False)
    text = render_report([run], tmp_path / "r.html").read_text()
    page = Page(text)
    assert len(page.imgs()) == 1 + 2  # curves + the two sample grids
    assert "Last logged metrics (step 2)" in text and "reward/mean" in page.rows
    assert "<dt>steps</dt><dd>2</dd>" in text


# ---------------------------------------------------------------------------------------------
# In a real browser

_CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var rows = Array.prototype.slice.call(document.querySelectorAll('tbody tr'));
  var m = document.createElement('meta');
  m.id = 'check';
  m.setAttribute('data-images', imgs.length);
  m.setAttribute('data-decoded', imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
  m.setAttribute('data-rows', rows.filter(function (r) { return r.getBoundingClientRect().height > 0; }).length);
  document.head.appendChild(m);
});
</script>"""


def find_chromium() -> str | None:
    """FINPERCEP_CHROMIUM, else `chromium` or `chromium-browser` on PATH."""
    env = os.environ.get("FINPERCEP_CHROMIUM")
    if env:
        found = shutil.which(env)
        if found is None:
            pytest.fail(f"FINPERCEP_CHROMIUM={env!r} is not an executable Chromium/Chrome binary")
        return found
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(binary: str, args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=True)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"{' '.join(cmd)} failed ({exc.returncode}):\n{exc.stderr[-2000:]}")


def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    binary = find_chromium()
    if binary is None:
        if os.environ.get("FINPERCEP_SKIP_BROWSER") == "1":
            pytest.skip("FINPERCEP_SKIP_BROWSER=1: browser check skipped")
        pytest.fail("No Chromium found for the browser test of the HTML report. Install it "
                    "(Debian: `apt-get update && apt-get install -y --no-install-recommends chromium`), "
                    "point FINPERCEP_CHROMIUM at a Chromium/Chrome binary, or set FINPERCEP_SKIP_BROWSER=1 to skip.")
    out = render_report(two_runs, tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    probe = tmp_path / "probe.html"  # a copy with the check script; the report itself has none
    probe.write_text(text.replace("</body>", _CHECK_SCRIPT + "</body>"), encoding="utf-8")

    dom = run_chromium(binary, ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "profile").stdout
    check = [attrs for tag, attrs in Page(dom).tags if tag == "meta" and attrs.get("id") == "check"]
    assert check, f"the check script did not run; DOM starts with: {dom[:500]}"
    n_img, n_rows = len(page.imgs()), len(page.rows)
    assert n_img == 7 and n_rows == 8
    assert int(check[0]["data-images"]) == n_img
    assert int(check[0]["data-decoded"]) == n_img, "some images did not decode in the browser"
    assert int(check[0]["data-rows"]) == n_rows, "some table rows were not laid out"

    shot = tmp_path / "shot.png"
    run_chromium(binary, [f"--screenshot={shot}", "--window-size=1000,1400", out.as_uri()], tmp_path / "profile2")
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert px.shape[:2] == (1400, 1000)
    assert px.std() > 10, "the screenshot is blank"
    assert (px.max(axis=2) - px.min(axis=2) > 60).mean() > 0.001  # some colour: the plotted curves
