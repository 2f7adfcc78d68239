"""``qwen-cls``: parses the command line and dispatches. The command table is :mod:`qwen_cls.commands`; ``fit``
and ``validate`` run LightningCLI (:mod:`qwen_cls.train`), the tools run through jsonargparse over their functions.
Nothing heavy is imported before a command runs: ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import inspect
import re
import sys

from qwen_cls.commands import COMMANDS, help_text
from qwen_cls.errors import ConfigError, QwenClsError


def main(argv: list[str] | None = None) -> None:
    from_sys_argv = argv is None
    argv = sys.argv[1:] if from_sys_argv else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        return
    if argv[0] in ("-V", "--version"):
        print(f"qwen-cls {version()}")
        return
    try:
        command = COMMANDS.get(argv[0])
        if command is None:
            raise ConfigError(
                f"{argv[0]!r} is not a command; choose one of {', '.join(COMMANDS)} (qwen-cls --help)"
            )
        if command.function is not None:
            run_tool(argv[0], argv[1:])
        else:
            from qwen_cls.train import run_lightning_cli

            run_lightning_cli(None if from_sys_argv else argv, exit_on_error=False)
    except QwenClsError as e:
        print(f"qwen-cls: error: {rank_tag()}{one_line(e)}", file=sys.stderr)
        sys.exit(2)
    end_process_group()


def run_tool(name: str, args: list[str]) -> None:
    """A tool's parameters parsed from its function's signature and docstring; its ``--help`` needs no more."""
    from jsonargparse import CLI, ArgumentError

    command = COMMANDS[name]
    if not any(a in ("-h", "--help") for a in args):
        from qwen_cls.console import quiet_library_chatter

        quiet_library_chatter()
    try:
        CLI(
            command.function,
            args=_bare_flags_true(command.function, args),
            prog=f"qwen-cls {name}",
            as_positional=command.positional,
            exit_on_error=False,
        )
    except ArgumentError as e:
        raise parse_error(e) from None


def _bare_flags_true(function, args: list[str]) -> list[str]:
    """``--watch`` alone means ``--watch=true`` for a function's bool parameters."""
    flags = {
        f"--{n}" for n, p in inspect.signature(function).parameters.items() if p.annotation in (bool, "bool")
    }
    return [
        f"{a}=true" if a in flags and (i + 1 == len(args) or args[i + 1].startswith("--")) else a
        for i, a in enumerate(args)
    ]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("qwen-cls")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def end_process_group() -> None:
    """Destroy the process group before the interpreter exits: left to finalization, gloo's worker threads can
    abort the process ("terminate called without an active exception", exit -6) after a run that succeeded.
    Only on success: after an error, another rank may still be inside a collective."""
    if "torch" not in sys.modules:  # a --help, or a tool that never needed it
        return
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_tag() -> str:
    """Every rank says its error, not rank 0 alone: the first rank to exit makes its launcher (srun
    --kill-on-bad-exit, torchrun, Lightning's child-process observer) kill the others, rank 0 too, often before
    rank 0 has said the same error (or rank 0, waiting in a collective, has none: a node's own missing folder)."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", 0)
    return f"rank {rank}: " if rank else ""


def one_line(error: QwenClsError) -> str:
    """The message alone, also when a DataLoader worker raised it (torch then wraps the worker's traceback)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.removeprefix(f"{type(error).__module__}.{type(error).__name__}: ")


if __name__ == "__main__":
    main()


def config_error_within(error: BaseException) -> ConfigError | None:
    """The ConfigError a section's ``__post_init__`` raised, where jsonargparse wrapped it (a section inside a
    union, ``model.lora``, is built while the value is checked against each type)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def parse_error(error: Exception) -> ConfigError:
    """jsonargparse's message as our one line, ``key: problem``: a bad choice lists the choices, an unknown key
    is named."""
    within = config_error_within(error)
    if within is not None:
        return within
    text = " ".join(str(error).split())
    keyed = re.fullmatch(r'Parser key "([^"]+)": (.*)', text)
    if not keyed:
        unknown = re.fullmatch(
            r"(?:Group '([^']+)'|Subcommand '[^']+') does not accept option '([^']+)'", text
        )
        if unknown:
            return ConfigError(f"{unknown[1] + '.' if unknown[1] else ''}{unknown[2]}: unknown key")
        flag = re.fullmatch(r"unrecognized arguments: --([\w.]+)(?:[= ].*)?", text)
        return ConfigError(f"{flag[1]}: unknown key" if flag else text)
    key, problem = keyed.groups()
    choice = re.fullmatch(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", problem)
    if choice:
        options = ", ".join(option.strip().strip("'") for option in choice[1].split(","))
        return ConfigError(f"{key}: {choice[2]!r} is not a choice; choose one of {options}")
    union = re.fullmatch(
        r"Does not validate against any of the Union subtypes Subtypes: \[(.*?)\] .*Given value: (.*)",
        problem,
    )
    if union:
        kinds = re.findall(r"<class '(\w+)'>|typing\.Literal\[([^\]]*)\]", union[1])
        options = [
            "true, false"
            if name == "bool"
            else name or ", ".join(o.strip().strip("'") for o in literal.split(","))
            for name, literal in kinds
        ]
        return ConfigError(f"{key}: {union[2]!r} is not a choice; choose one of {', '.join(options)}")
    expected = re.fullmatch(r"Expected a <class '(\w+)'>\. Got value: (.*)", problem)
    if expected:
        return ConfigError(f"{key}: expected {expected[1]}, got {expected[2]!r}")
    return ConfigError(f"{key}: {problem}")
