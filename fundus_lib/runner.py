"""Execute the notebooks with papermill and summarise the run (``make run`` / ``make notebooks``).

    python -m fundus_lib.runner --profile quick                 # -> runs/<timestamp>/, summary.md
    python -m fundus_lib.runner --profile smoke --only 00 11    # a subset, by number prefix
    python -m fundus_lib.runner --profile quick --in-place      # refresh the committed outputs
    python -m fundus_lib.runner --profile gpu                   # reference results on a GPU

Each notebook runs in its own kernel with ``profile`` injected (every other parameter falls back
to ``configs/<notebook>/<profile>.yaml``). A failing notebook is reported by name with the
failing cell's traceback; the others still run. The exit status is 1 when any notebook failed.

Runs whose numbers are committed — ``--in-place`` (quick) and every ``gpu`` run — also write
``results/<notebook>/<profile>.json``: every recorded metric with the hardware, software versions,
commit, date and minutes of the run (:func:`write_results`), for the notebooks to show beside
their own numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nbformat

from fundus_lib.config import PROFILES, project_root


@dataclass
class NotebookResult:
    name: str
    status: str
    minutes: float
    metrics: dict = field(default_factory=dict)
    error: str = ""


def discover(root: Path, only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in ``notebooks/``, optionally filtered by name prefixes."""
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(prefix) for prefix in only)]
        if not notebooks:
            raise SystemExit(f"no notebook in {root / 'notebooks'} matches {only}")
    return notebooks


def strip_papermill_metadata(path: Path) -> None:
    """Remove papermill's per-cell timing metadata so committed notebooks diff cleanly."""
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata.pop("papermill", None)
    for cell in notebook.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)


def compact_images(path: Path) -> int:
    """Re-encode the notebook's PNG outputs as 256-colour palette PNGs where that is smaller (figures
    lose nothing visible; photographs keep their look at preview size), so committed notebooks stay
    well under the repository's 2 MB limit. Returns the bytes saved."""
    import base64
    import io

    from PIL import Image

    notebook = nbformat.read(path, as_version=4)
    saved = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            original = base64.b64decode(data["image/png"])
            image = Image.open(io.BytesIO(original))
            mode = "RGBA" if "A" in image.getbands() else "RGB"
            buffer = io.BytesIO()
            image.convert(mode).quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, "PNG", optimize=True)
            if buffer.tell() < len(original):
                saved += len(original) - buffer.tell()
                data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    nbformat.write(notebook, path)
    return saved


def _summarise_metrics(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: v["value"] for k, v in data.items() if not k.startswith("_") and isinstance(v["value"], (int, float))}


def write_results(result: NotebookResult, sidecar: Path, profile: str, root: Path) -> Path:
    """``results/<notebook>/<profile>.json`` from a finished run's metrics sidecar (written atomically)."""
    from fundus_lib.nbtools import environment
    from fundus_lib.utils import atomic_write

    recorded = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    meta = recorded.pop("_meta", {})
    facts = environment()
    payload = {
        "notebook": result.name, "profile": profile, "data": meta.get("data"),
        "hardware": facts["device"], "environment": facts, "commit": facts["git commit"],
        "date": datetime.now().astimezone().isoformat(timespec="seconds"), "minutes": round(result.minutes, 2),
        "parameters": meta.get("parameters"), "metrics": recorded,
    }
    path = root / "results" / result.name / f"{profile}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as stream:
        stream.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


#: The roadmap row of a notebook in README.md; its last cell holds the quick-profile minutes.
_ROADMAP_ROW = r"^(\| \d\d \| \[[^\]]+\]\(notebooks/{stem}\.ipynb\) \|.*\| )[0-9.]+( \|)$"
#: How a notebook's opening states its quick-profile run time.
_OPENING = re.compile(r"(quick profile \(the committed outputs\)\s+)(?:about \d+ minutes?|under 1 minute)")


def state_run_time(notebook: Path, minutes: float, root: Path) -> list[str]:
    """Write a committed run's minutes where people read them — the README roadmap row and the
    notebook's opening ("about N minutes") — so both always equal ``results/<notebook>/quick.json``.
    Returns the places that hold no run-time statement to update (a test fails on them)."""
    missing, minutes = [], round(minutes, 2)  # as write_results records it
    readme = root / "README.md"
    text, found = re.subn(_ROADMAP_ROW.format(stem=re.escape(notebook.stem)), rf"\g<1>{round(minutes, 1):.1f}\g<2>",
                          readme.read_text(), flags=re.M)
    if found:
        from fundus_lib.utils import atomic_write

        with atomic_write(readme) as stream:
            stream.write(text)
    else:
        missing.append(f"README.md has no roadmap row linking notebooks/{notebook.name}")
    phrase = "under 1 minute" if minutes < 1 else f"about {max(1, round(minutes))} minute{'s' if round(minutes) > 1 else ''}"
    nb = nbformat.read(notebook, as_version=4)
    opening = [cell for cell in nb.cells[:3] if cell.cell_type == "markdown" and _OPENING.search(cell.source)]
    if opening:
        opening[0].source = _OPENING.sub(lambda m: m.group(1) + phrase, opening[0].source, count=1)
        nbformat.write(nb, notebook)
    else:
        missing.append(f"{notebook.name}: no 'quick profile (the committed outputs) about N minutes' in its opening")
    return missing


def run_notebook(notebook: Path, out_dir: Path, profile: str, root: Path, inject: bool) -> NotebookResult:
    """Execute one notebook into ``out_dir`` with papermill; never raises for a notebook failure."""
    import papermill as pm

    output = out_dir / notebook.name
    sidecar = out_dir / f"{notebook.stem}.metrics.json"
    sidecar.unlink(missing_ok=True)
    kernel_env = {"FUNDUS_METRICS_PATH": str(sidecar), "FUNDUS_HOME": str(root),
                  "MPLBACKEND": "module://matplotlib_inline.backend_inline",
                  # passive OpenMP waiting: no spin-waiting threads when the machine is busy
                  "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env_before = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    started = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(output), parameters={"profile": profile} if inject else {},
                            cwd=str(notebook.parent), kernel_name="python3", progress_bar=False)
        status, error = "ok", ""
    except pm.PapermillExecutionError as failure:
        status = "FAILED"
        error = f"cell {failure.exec_count}: {failure.ename}: {failure.evalue}\n" + "\n".join(failure.traceback)
    except Exception as failure:  # kernel death, missing kernel, unreadable notebook
        status, error = "FAILED", f"{type(failure).__name__}: {failure}"
    finally:
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    minutes = (time.perf_counter() - started) / 60
    return NotebookResult(notebook.stem, status, minutes, _summarise_metrics(sidecar), error)


def write_summary(results: list[NotebookResult], path: Path, profile: str) -> None:
    """``summary.md``: one row per notebook with status, minutes and recorded metrics."""
    lines = [f"# Notebook run — profile `{profile}`, {datetime.now():%Y-%m-%d %H:%M}", "",
             "Numbers from the `smoke`, `quick` and `gpu` profiles are measured on the synthetic benchmark.", "",
             "| notebook | status | minutes | recorded metrics |", "|---|---|---|---|"]
    for result in results:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.metrics.items())
        lines.append(f"| {result.name} | {result.status} | {result.minutes:.2f} | {metrics} |")
    failures = [r for r in results if r.status != "ok"]
    for result in failures:
        lines += ["", f"## {result.name} failed", "", "```", result.error, "```"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", choices=[p for p in PROFILES if p != "full"])
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 11")
    parser.add_argument("--in-place", action="store_true",
                        help="replace the committed notebooks with their executed versions (quick profile only)")
    args = parser.parse_args(argv)
    if args.in_place and args.profile != "quick":
        parser.error("--in-place is for the quick profile: committed notebooks carry quick-profile outputs")

    root = project_root()
    out_dir = root / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for notebook in discover(root, args.only):
        print(f"running {notebook.name} ({args.profile}) ...", flush=True)
        result = run_notebook(notebook, out_dir, args.profile, root, inject=not args.in_place)
        print(f"  {result.status} in {result.minutes:.2f} min", flush=True)
        if result.status != "ok":
            print(f"  {notebook.name} failed at {result.error}", file=sys.stderr)
        elif args.in_place:
            executed = out_dir / notebook.name
            strip_papermill_metadata(executed)
            compact_images(executed)
            staged = notebook.with_suffix(".ipynb.tmp")
            shutil.copyfile(executed, staged)
            os.replace(staged, notebook)  # atomic: a committed notebook is never half-written
            for problem in state_run_time(notebook, result.minutes, root):
                print(f"  run time not stated: {problem}", file=sys.stderr)
        if result.status == "ok" and (args.in_place or args.profile == "gpu"):
            print(f"  results: {write_results(result, out_dir / f'{notebook.stem}.metrics.json', args.profile, root)}")
        results.append(result)
    summary = out_dir / "summary.md"
    write_summary(results, summary, args.profile)
    print(f"summary: {summary}")
    return 1 if any(r.status != "ok" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
