"""Rebuild `.dvc/plots/offline.html`: the page `dvc plots show` fills, with vega, vega-lite and vega-embed inlined.

DVC's default page (dvc_render's `PAGE_HTML`) loads the three libraries from cdn.jsdelivr.net, so it shows
nothing offline. `dvc_render.html.HTML` fills a template by plain string replacement of three placeholders:
`{plot_divs}` (required: one `<div>` + `vegaEmbed(...)` call per plot), `{scripts}` (the renderer's
`<script src="https://cdn.jsdelivr.net/npm/vega@5.20.2">` ... tags) and `{refresh_tag}` (optional meta refresh).
This template has no `{scripts}`, so the CDN tags are dropped, and carries the libraries itself: the versions
dvc_render 1.0.2 (DVC 3.67) references, vega 5.20.2, vega-lite 5.2.0 and vega-embed 6.18.2, from the files
jsDelivr serves for those URLs (each package.json's "jsdelivr" field: build/*.min.js). All three are BSD-3-Clause;
their LICENSE text is kept in a comment before each script.

Get the files from the npm registry and rebuild (stdlib only):

    cd /tmp && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    for p in vega-5.20.2 vega-lite-5.2.0 vega-embed-6.18.2; do mkdir -p $p && tar xzf $p.tgz -C $p; done
    cd - && python .dvc/plots/build_template.py /tmp/vega-5.20.2/package/build/vega.min.js \\
        /tmp/vega-lite-5.2.0/package/build/vega-lite.min.js /tmp/vega-embed-6.18.2/package/build/vega-embed.min.js

Use it with `dvc plots show --html-template .dvc/plots/offline.html`, or set it once with
`dvc config plots.html_template plots/offline.html` (DVC joins a relative `plots.html_template` to the
`.dvc/` directory; `--html-template` on the command line is relative to the working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
LIBS = (("vega", ".vega="), ("vega-lite", ".vegaLite="), ("vega-embed", ".vegaEmbed="))  # name, UMD global it sets

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined by .dvc/plots/build_template.py: no network needed -->
@SCRIPTS@
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def _header(js_path: Path, name: str) -> str:
    """`/*! name@version (license) + LICENSE text */` from the npm package around `js_path`, when it is there."""
    pkg_dir = js_path.resolve().parent.parent
    version, lic, text = "?", "?", ""
    if (pkg_dir / "package.json").is_file():
        meta = json.loads((pkg_dir / "package.json").read_text(encoding="utf8"))
        version, lic = meta.get("version", "?"), meta.get("license", "?")
    if (pkg_dir / "LICENSE").is_file():
        text = "\n" + (pkg_dir / "LICENSE").read_text(encoding="utf8").replace("*/", "* /").strip()
    return f"/*! {name}@{version} ({lic}){text}\n*/"


def script_block(js_path: Path, name: str, umd_global: str) -> str:
    code = _header(js_path, name) + "\n" + js_path.read_text(encoding="utf8").strip()
    low = code.lower()
    if umd_global not in code:
        sys.exit(f"error: {js_path} does not look like the {name} browser build (no `{umd_global}`); check the order")
    if "</script" in low or "<!--" in low or "<script" in low:
        sys.exit(f"error: {js_path} contains `<script`, `</script` or `<!--`; it cannot be inlined as is")
    found = [p for p in PLACEHOLDERS if p in code]
    if found:
        sys.exit(f"error: {js_path} contains {found}, which DVC would replace; it cannot be inlined as is")
    return f"    <script>\n{code}\n    </script>"


def build(vega: Path, vega_lite: Path, vega_embed: Path) -> str:
    blocks = [script_block(Path(p), name, g) for p, (name, g) in zip((vega, vega_lite, vega_embed), LIBS)]
    return PAGE.replace("@SCRIPTS@", "\n".join(blocks))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline HTML template for `dvc plots show`.")
    parser.add_argument("vega", type=Path, help="vega/build/vega.min.js")
    parser.add_argument("vega_lite", type=Path, help="vega-lite/build/vega-lite.min.js")
    parser.add_argument("vega_embed", type=Path, help="vega-embed/build/vega-embed.min.js")
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).with_name("offline.html"))
    args = parser.parse_args(argv)
    for p in (args.vega, args.vega_lite, args.vega_embed):
        if not p.is_file():
            sys.exit(f"error: {p}: file not found (see `npm pack` in this script's docstring)")
    page = build(args.vega, args.vega_lite, args.vega_embed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", suffix=".tmp", dir=args.out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf8") as fh:
            fh.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {args.out} ({len(page.encode()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
