"""Prepare offline datasets once into a tfds data dir.

    python -m transferlab.data.prepare --datasets mnist5k,digits [--data_dir D]

data_dir defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets. Already
prepared datasets are left as they are. Errors: one line on stderr, exit 2.
"""

import sys

from transferlab.data import builders
from transferlab.errors import OneLineArgumentParser, UserError, exit_with, unknown_name


def prepare_all(names, data_dir=None) -> dict:
    """Prepares each offline dataset in `names`; returns {name: its directory}."""
    for name in names:
        if name not in builders.OFFLINE_BUILDERS:
            raise unknown_name("offline dataset", name, builders.OFFLINE_BUILDERS)
    builders.resolve_data_dir(data_dir, setting="--data_dir")  # (its errors name the flag)
    return {name: str(builders.prepare(name, data_dir).data_dir) for name in names}


def main(argv=None) -> int:
    parser = OneLineArgumentParser(prog="python -m transferlab.data.prepare", description=__doc__.splitlines()[0],
                                   label="transferlab.data.prepare")
    parser.add_argument("--datasets", required=True,
                        help=f"comma-separated, from: {','.join(sorted(builders.OFFLINE_BUILDERS))}")
    parser.add_argument("--data_dir", default=None, help="tfds data dir")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    try:
        if not names:
            raise UserError(f"--datasets: no dataset named; expected some of {','.join(sorted(builders.OFFLINE_BUILDERS))}")
        for name, path in prepare_all(names, args.data_dir).items():
            print(f"{name}: {path}")
    except UserError as e:
        print(f"{parser.label}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_with(main)
