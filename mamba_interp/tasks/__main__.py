"""``python -m mamba_interp.tasks train ...`` (same as ``mamba-interp train``) and
``python -m mamba_interp.tasks build-zoo [NAMES...]`` (retrain and re-card zoo models)."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = ("train", "build-zoo")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m mamba_interp.tasks {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    if argv[0] == "train":
        from mamba_interp.tasks.training import main as train_main

        return train_main(argv[1:])
    from mamba_interp.tasks.build_zoo import main as build_main

    return build_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
