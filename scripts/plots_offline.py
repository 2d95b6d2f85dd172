"""`dvc plots show` with a page that works offline: Vega, Vega-Lite and Vega-Embed inlined, nothing from a CDN.

    python scripts/plots_offline.py                  # writes dvc_plots/index.html, as `dvc plots show` does
    python scripts/plots_offline.py -o /tmp/plots    # other `dvc plots show` options and targets pass through
    python scripts/plots_offline.py --template-only FILE   # only write the template (then: dvc plots show
                                                           #   --html-template FILE)

DVC's own page loads the three JavaScript libraries from a CDN, so without a network its curves stay blank (the
image plots show either way). This writes an HTML template holding them inline, taken from the pinned
`vl-convert-python` package (its standard bundle: Vega-Embed, Vega-Lite and Vega, the same libraries the CDN serves),
and runs `dvc plots show --html-template <it>`. The page is one self-contained file: open it from disk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# DVC's plot templates are Vega-Lite 5 specifications (dvc_render.vega_templates): render them with Vega-Lite 5
VEGA_LITE_MAJOR = "5"
# the placeholders dvc_render.html.HTML fills in a template; the inlined JavaScript must not contain them
PLOTS = "{plot_divs}"
DVC_PLACEHOLDERS = ("{scripts}", PLOTS, "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot (offline)</title>
    <!-- Vega-Embed, Vega-Lite {vl_version} and Vega, inlined from vl-convert-python {vlc_version}: no network -->
    <script>
{bundle}
    </script>
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


def vega_lite_version(available: Sequence[str]) -> str:
    """The newest Vega-Lite 5.x that vl-convert bundles (DVC's templates are Vega-Lite 5)."""
    fives = [v for v in available if v.split(".")[0] in (VEGA_LITE_MAJOR, f"v{VEGA_LITE_MAJOR}")]
    if not fives:
        raise RuntimeError(f"vl-convert-python bundles no Vega-Lite {VEGA_LITE_MAJOR}.x (it has {list(available)}): "
                           "DVC's plot templates need it; install the version pinned in pyproject.toml")
    return max(fives, key=lambda v: tuple(int(part) for part in v.lstrip("v").split(".") if part.isdigit()))


def offline_template() -> str:
    """The HTML template for `dvc plots show --html-template`: DVC's page with the libraries inlined."""
    try:
        import vl_convert as vlc
    except ImportError as error:
        raise RuntimeError("the offline plots page needs the vl-convert-python package (a dependency in "
                           "pyproject.toml): run `bash scripts/dev.sh setup`") from error
    version = vega_lite_version(vlc.get_vegalite_versions())
    bundle = vlc.javascript_bundle(vl_version=version)
    found = [p for p in DVC_PLACEHOLDERS if p in bundle]
    if found:
        raise RuntimeError(f"the Vega bundle contains DVC's template placeholders {found}; it cannot be inlined")
    # inside <script>, the text `</script` would end the element early: `<\/` is the same string in JavaScript
    bundle = bundle.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    page = PAGE.replace("{vl_version}", version).replace("{vlc_version}", getattr(vlc, "__version__", "?"))
    return page.replace("{bundle}", bundle)


def write_template(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(offline_template(), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are passed to `dvc plots show`.")
    parser.add_argument("--template-only", type=Path, metavar="FILE",
                        help="write the offline template to FILE and stop")
    args, dvc_args = parser.parse_known_args(argv)
    if "--html-template" in dvc_args:
        parser.error("--html-template is what this script sets; run `dvc plots show` itself for another template")
    try:
        if args.template_only:
            print(f"offline plots template: {write_template(args.template_only)}")
            return 0
        with tempfile.TemporaryDirectory(prefix="ph-reg-plots-") as folder:
            template = write_template(Path(folder) / "offline.html")
            env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_DAEMON": "0"}
            command = [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template), *dvc_args]
            return subprocess.run(command, env=env, check=False).returncode
    except RuntimeError as error:
        print(f"plots_offline: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
