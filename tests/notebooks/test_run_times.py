"""One source for run times: the minutes `make notebooks` recorded in results/<notebook>/quick.json.
The README's roadmap table and each notebook's opening must state those minutes, so a student never
reads two different run times for the same notebook."""
import json
import re

from tests.notebooks.conftest import NOTEBOOKS, ROOT, notebook_params, read

ROADMAP_ROW = re.compile(r"^\| (\d\d) \| \[[^\]]+\]\(notebooks/([^)]+)\.ipynb\) \|.*\| ([0-9.]+) \|$", re.M)
OPENING = re.compile(r"quick profile \(the committed outputs\)\s+(?:about (\d+) minutes?|under 1 minute)")


def recorded_minutes(stem: str) -> float:
    return json.loads((ROOT / "results" / stem / "quick.json").read_text())["minutes"]


def test_readme_roadmap_states_the_recorded_minutes():
    rows = {stem: float(minutes) for _, stem, minutes in ROADMAP_ROW.findall((ROOT / "README.md").read_text())}
    assert set(rows) == {nb.stem for nb in NOTEBOOKS}, "the README roadmap must list every notebook with its minutes"
    for stem, minutes in rows.items():
        assert minutes == round(recorded_minutes(stem), 1), \
            f"README says {stem} takes {minutes} min, results/{stem}/quick.json records {recorded_minutes(stem)}"


@notebook_params()
def test_notebook_opening_states_the_recorded_minutes(notebook):
    opening = "\n".join(c.source for c in read(notebook).cells[:3] if c.cell_type == "markdown")
    match = OPENING.search(opening)
    assert match, f"{notebook.name}: the opening must say 'quick profile (the committed outputs) about N minutes'"
    minutes = recorded_minutes(notebook.stem)
    if match.group(1) is None:
        assert minutes < 1, f"{notebook.name} says under 1 minute, the committed run took {minutes}"
    else:
        assert int(match.group(1)) == max(1, round(minutes)), \
            f"{notebook.name} says about {match.group(1)} minutes, the committed run took {minutes}"
