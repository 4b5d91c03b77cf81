"""The `agpipe` command (and `python -m agpipe`): keeps bytecode where the environment forbids it
beside the sources (agpipe.home.keep_bytecode) and the compiled model and kernels in AGPIPE_HOME
(agpipe.home.keep_compile_cache) before anything heavy is imported, then runs the command line. Tests call agpipe.cli.main
directly, leaving their own process as it is."""

from __future__ import annotations


def main() -> None:
    from agpipe.home import keep_bytecode, keep_compile_cache

    keep_bytecode()
    keep_compile_cache()
    from agpipe.cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()
