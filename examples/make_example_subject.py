"""Draw the bundled example DreamBooth subject: the toy robot of the procedural world.

It is :data:`hra_diffusion.world.subjects.SUBJECTS` ``["robot"]``: an orange body, a
purple head and cyan details, colours the bundled model's world never uses, shown in
five views on five world backgrounds (never blue, which the demo asks for), each with a
caption file naming its background ("a qwe toy on a white background") for the demo's
``--caption_extension .txt``. Deterministic: running it again rewrites identical files.
Usage::

    python examples/make_example_subject.py [--out examples/subject]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hra_diffusion.world.subjects import SUBJECTS, write_views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "subject"))
    paths = write_views(SUBJECTS["robot"], parser.parse_args().out, caption="a qwe toy")
    print(f"wrote {len(paths)} images and their captions to {Path(paths[0]).parent}")


if __name__ == "__main__":
    main()
