"""``python -m ph_reg`` runs the Kedro project like ``kedro run``; ``python -m ph_reg export ...`` is the project's
``kedro export`` (a distilled student for plain timm or the Hugging Face Hub)."""

import sys
from pathlib import Path

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project


def main(*args, **kwargs):
    if sys.argv[1:2] == ["export"]:
        from ph_reg.cli import export

        return export.main(sys.argv[2:], prog_name="python -m ph_reg export", **kwargs)
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    run = find_run_command(package_name)
    run(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())

