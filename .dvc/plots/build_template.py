"""Assemble ``.dvc/plots/template.html``: the page ``dvc plots show`` writes, with vega inlined.

dvc-render's default page loads vega, vega-lite and vega-embed from a CDN, so its charts stay
blank without internet. This template carries the same three libraries (the versions
dvc-render asks the CDN for) inside the page, so the HTML works offline and wherever it is
copied. Rebuild it from the npm registry's tarballs::

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python .dvc/plots/build_template.py vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).with_name("template.html")
ORDER = ("vega", "vega-lite", "vega-embed")  # vega-embed needs the other two loaded first
# What dvc-render substitutes; the libraries must not contain these, nor end the <script>.
FORBIDDEN = ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- {versions}: inlined by .dvc/plots/build_template.py so that the page works offline;
         BSD-3-Clause, see .dvc/plots/LICENSE -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def read_library(tarball: Path) -> tuple[str, str, str]:
    """(name, version, minified source without its source-map comment) of an npm tarball."""
    with tarfile.open(tarball) as tar:
        meta = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
        source = tar.extractfile(f"package/{meta['jsdelivr']}").read().decode("utf-8")  # type: ignore[union-attr]
    source = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", source)
    for bad in FORBIDDEN:
        if bad in source:
            raise SystemExit(f"{tarball}: contains {bad!r}, cannot be inlined")
    return meta["name"], meta["version"], source


def main(tarballs: list[str]) -> None:
    libraries = {name: (version, source) for name, version, source in map(read_library, map(Path, tarballs))}
    if sorted(libraries) != sorted(ORDER):
        raise SystemExit(f"need the tarballs of {', '.join(ORDER)}, got {', '.join(libraries) or 'none'}")
    scripts = "\n".join(f"    <script>{libraries[name][1]}</script>" for name in ORDER)
    versions = ", ".join(f"{name} {libraries[name][0]}" for name in ORDER)
    OUT.write_text(PAGE.format(versions=versions, scripts=scripts), encoding="utf-8")
    print(f"{versions} -> {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
