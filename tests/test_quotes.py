"""Numbers in prose that come from a run are tied to the file the run wrote, so they cannot drift.

A number in the README or in a notebook's markdown that a run produced carries a marker right after it naming its
source:

    image-space FID 107.1<!-- from results/fashion.json image.fid -->

The key is a dotted path into the JSON; a list is entered by an index (`rows.0.fid`) or by a filter on its records
(`[model=edm,sampler=heun,nfe=35].fid` for a file that is a list, `rows[variant=tmsa,seed=0].fid` inside one;
exactly one record must match). The quoted number (thousands separators
allowed) must equal the file's value rounded to the decimals quoted. Markers render as nothing in Markdown.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)\s*<!-- from (\S+) (\S+) -->")


def lookup(data, key):
    """The value at a dotted key, e.g. 'rows.0.fid' or '[model=edm,nfe=35].fid'."""
    for part in re.findall(r"\[[^\]]*\]|[^.\[\]]+", key):
        if part.startswith("["):
            if not isinstance(data, list):
                raise KeyError(f"{part} filters a list, not a {type(data).__name__}")
            wanted = dict(kv.split("=", 1) for kv in part[1:-1].split(","))
            found = [r for r in data if all(str(r.get(k)) == v for k, v in wanted.items())]
            if len(found) != 1:
                raise KeyError(f"{part} matches {len(found)} records, not one")
            data = found[0]
        elif isinstance(data, list):
            data = data[int(part)]
        else:
            data = data[part]
    return data


def check_quotes(text, root=ROOT):
    """Every marked number in text against its source -> list of problems (empty when all agree)."""
    problems, cache = [], {}
    for m in MARKER.finditer(text):
        quoted, source, key = m[1], m[2], m[3]
        path = root / source
        if source not in cache:
            cache[source] = json.loads(path.read_text()) if path.is_file() else None
        if cache[source] is None:
            problems.append(f"{quoted}: {source} does not exist")
            continue
        try:
            value = lookup(cache[source], key)
        except (KeyError, IndexError, ValueError) as e:
            problems.append(f"{quoted}: no {key} in {source} ({e})")
            continue
        decimals = len(quoted.split(".")[1]) if "." in quoted else 0
        if not isinstance(value, (int, float)) or round(float(value), decimals) != float(quoted.replace(",", "")):
            problems.append(f"{quoted} quoted, but {source} {key} = {value}")
    return problems


def prose():
    """(name, markdown text) of the README and every notebook's markdown cells."""
    yield "README.md", (ROOT / "README.md").read_text()
    for nb in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        yield str(nb.relative_to(ROOT)), "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@pytest.mark.parametrize("name,text", list(prose()), ids=lambda x: x if isinstance(x, str) and len(x) < 60 else "")
def test_quoted_numbers_agree_with_their_results_files(name, text):
    assert check_quotes(text) == [], name


def test_the_readme_quotes_numbers_from_results_files():
    assert len(MARKER.findall((ROOT / "README.md").read_text())) >= 10


def test_a_planted_wrong_number_fails(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"fid": 107.094, "steps": 1091,
                                                 "rows": [{"model": "edm", "nfe": 35, "fid": 107.094}]}))
    good = ("FID 107.1<!-- from r.json fid --> after 1,091<!-- from r.json steps --> steps; "
            "Heun 107.09 <!-- from r.json rows[model=edm,nfe=35].fid -->")
    assert check_quotes(good, tmp_path) == []
    assert check_quotes(good.replace("107.1", "107.2"), tmp_path) == ["107.2 quoted, but r.json fid = 107.094"]
    assert check_quotes(good.replace("1,091", "1,092"), tmp_path) != []
    assert "matches 0 records" in check_quotes("1.0<!-- from r.json rows[model=x].fid -->", tmp_path)[0]
    assert "does not exist" in check_quotes("1.0<!-- from gone.json fid -->", tmp_path)[0]
