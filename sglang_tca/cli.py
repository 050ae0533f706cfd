"""`python launch.py` = `sglang_tca.cli.main(argv)`: an SGLang HTTP server with TCA attention.

    python launch.py [--model PATH] [--tca-budgets FILE] [--tca-window N] [--tca-block N]
                     [--tca-policy tca|random|streaming] [--tca-dense-tokens N] [--no-tca] [...any sglang server flag]

Our flags are parsed with `parse_known_args`; everything else goes to SGLang's `prepare_server_args` unchanged,
except that with TCA on `--disable-prefill-cuda-graph` is added (`plugin.PREFILL_GRAPH_REASON`; an explicit other
prefill graph backend is refused). `--model` (SGLang's own alias) / `--model-path` default to the embedded SmolLM2.
TCA is on (`--attention-backend tca`) unless `--no-tca` or another `--attention-backend` is given. Bad input ends with
one `error: ...` line on stderr and exit code 2 (set SGLANG_TCA_DEBUG=1 for the traceback), SGLang's own assertions
included. The model and budgets are checked before SGLang is imported; the flags TCA refuses are checked on the raw
values first (before SGLang's resolution can trip over them), then again on the resolved ServerArgs.
"""
from __future__ import annotations

import argparse
import contextlib
import linecache
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from sglang_tca.config import CALIBRATE_HINT, ENV_VAR, TCAConfig, check_model_path
from sglang_tca.params import OBSERVE_PREFILLS, POLICIES
from sglang_tca.plugin import DISABLE_PREFILL_GRAPH_FLAG, PREFILL_GRAPH_REASON

EXIT_BAD_INPUT = 2
BACKEND = "tca"


class CLIError(ValueError):
    """Bad command-line input; the message is printed as `error: <message>`."""


def _tca_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", add_help=False, allow_abbrev=False,
                                description=f"SGLang server with TCA sparse attention. Other flags go to SGLang; "
                                            f"with TCA on, {DISABLE_PREFILL_GRAPH_FLAG} is added: "
                                            f"{PREFILL_GRAPH_REASON}.")
    g = p.add_argument_group("TCA options")
    g.add_argument("--model", "--model-path", dest="model", metavar="PATH",
                   help="model directory, GGUF file or HF repo id (default: the embedded SmolLM2)")
    g.add_argument("--tca-budgets", metavar="FILE",
                   help=f"budgets file (default: tca_budgets.json in the model directory, then the shipped budgets "
                        f"of the embedded model); to make one, {CALIBRATE_HINT}")
    g.add_argument("--tca-window", type=int, metavar="N", help="dense local window in tokens (default: the budgets')")
    g.add_argument("--tca-block", type=int, metavar="N", help="block size; must match the budgets' block")
    g.add_argument("--tca-policy", choices=POLICIES, metavar="P",
                   help="token selection: tca (default), or an evaluation baseline: random (TCA's budget, random "
                        "tokens), streaming (sink + window only)")
    g.add_argument("--tca-observe", type=int, metavar="N",
                   help="question-aware end of prompt (a prompt's last N queries re-choose its compressed tokens; "
                        "such a prompt stays dense until its end and is not shared through the radix cache; "
                        "default 0 = off; see docs/ALGORITHM.md)")
    g.add_argument("--tca-observe-prefill", choices=OBSERVE_PREFILLS, metavar="P",
                   help="what an observing prompt's own queries see: sparse (default: TCA's selection) or dense "
                        "(the whole prompt; only the decode reads the question-aware choice); needs --tca-observe")
    g.add_argument("--tca-dense-tokens", type=int, metavar="N",
                   help="slots of the dense KV pool (sinks, windows, prefill chunks in flight); the rest of the KV "
                        "budget holds the compressed store (default: 20%% of the budget, or enough windows for "
                        "--max-running-requests)")
    g.add_argument("--no-tca", action="store_true", help="serve with SGLang's default attention (dense baseline)")
    return p


def _backend_parser() -> argparse.ArgumentParser:
    """Peeks at SGLang's backend flags in the pass-through arguments (they stay there)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--attention-backend")
    p.add_argument("--prefill-attention-backend")
    p.add_argument("--decode-attention-backend")
    return p


class QuietParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise CLIError (one line, `see PROG --help`) instead of usage + exit 2."""

    def error(self, message):
        raise CLIError(f"{message} (see {self.prog} --help)")


def _parse(argv: Sequence[str]):
    p = _tca_parser()
    q = QuietParser(parents=[p], add_help=False, allow_abbrev=False, prog="python launch.py")
    ours, rest = q.parse_known_args(list(argv))
    peek, _ = QuietParser(parents=[_backend_parser()], add_help=False, allow_abbrev=False,
                          prog="python launch.py").parse_known_args(rest)
    return p, ours, rest, peek


@contextlib.contextmanager
def _argparse_errors_raise():
    """SGLang's parser reports a bad flag as usage (hundreds of lines) + exit 2; make it one CLIError line instead."""
    orig = argparse.ArgumentParser.error

    def error(self, message):
        raise CLIError(f"{message} (see python launch.py --help)")

    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = orig


def _default_model() -> str:
    try:
        from sglang_tca.embedded_model import embedded_model_dir
    except ImportError as e:
        raise CLIError(f"no --model given and the embedded model is not available ({e})") from None
    try:
        return str(embedded_model_dir())
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"no --model given and the embedded model is not available: {e}") from None


def prepare(argv: Sequence[str], environ=None):
    """Parse and check everything short of starting the server. Returns (server_args, runtime or None), and with TCA
    on puts the config for the scheduler processes in `environ` (restored to its previous value when a check fails).
    Raises CLIError / TCAConfigError / BudgetsError (printed as one line by `main`)."""
    environ = os.environ if environ is None else environ
    _, ours, rest, peek = _parse(argv)

    model_defaulted = ours.model is None
    model = _default_model() if model_defaulted else ours.model
    check_model_path(model)

    chosen = peek.attention_backend
    use_tca = not ours.no_tca and chosen in (None, BACKEND)
    tca_flags = [f for f, v in (("--tca-budgets", ours.tca_budgets), ("--tca-window", ours.tca_window),
                                ("--tca-block", ours.tca_block), ("--tca-policy", ours.tca_policy),
                                ("--tca-observe", ours.tca_observe),
                                ("--tca-observe-prefill", ours.tca_observe_prefill),
                                ("--tca-dense-tokens", ours.tca_dense_tokens))
                 if v is not None]
    if ours.no_tca and chosen == BACKEND:
        raise CLIError("--no-tca contradicts --attention-backend tca")
    runtime = None
    if use_tca:
        cfg = TCAConfig(budgets=None if ours.tca_budgets is None else str(Path(ours.tca_budgets).expanduser().resolve()),
                        window=ours.tca_window, block=ours.tca_block, policy=ours.tca_policy,
                        observe=ours.tca_observe, observe_prefill=ours.tca_observe_prefill,
                        dense_tokens=ours.tca_dense_tokens)
        runtime = cfg.resolve(model, is_embedded=True if model_defaulted else None)
        if chosen is None:
            rest = [*rest, "--attention-backend", BACKEND]
        # SGLang's explicit prefill graph flags win over this one, and the validation hook refuses them
        rest = [*_with_tca_memory_flags(rest, runtime.block), DISABLE_PREFILL_GRAPH_FLAG]
    elif tca_flags:
        why = "--no-tca" if ours.no_tca else f"--attention-backend {chosen}"
        print(f"warning: TCA is off ({why}); ignoring {', '.join(tca_flags)}", file=sys.stderr)

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    from sglang_tca.plugin import register, validate_server_args

    load_plugins()
    register()
    sgl_argv = ["--model-path", model, *rest]
    previous = environ.get(ENV_VAR)
    if use_tca:      # SGLang's resolution runs our validation hook, which reads the config from the environment
        runtime.handoff().to_env(environ)
    else:
        environ.pop(ENV_VAR, None)
    try:
        with _argparse_errors_raise(), _sglang_assertions():
            if use_tca:
                parser = argparse.ArgumentParser(prog="launch.py")  # as prepare_server_args parses (abbreviations too)
                ServerArgs.add_cli_args(parser)
                validate_server_args(parser.parse_known_args(sgl_argv)[0], runtime)  # unknown flags: just below
            server_args = prepare_server_args(sgl_argv)
            server_args.check_server_args()  # SGLang runs it only inside launch_server, where it ends in a traceback
        if use_tca:
            if server_args.attention_backend != BACKEND:
                raise CLIError(f"SGLang resolved --attention-backend to {server_args.attention_backend!r}, not tca")
            if server_args.encoder_only or server_args.smg_grpc_mode or server_args.use_ray:
                raise CLIError("TCA is served only by the HTTP server (not --encoder-only, --smg-grpc-mode or "
                               "--use-ray)")
            runtime.for_rank(0, server_args.tp_size)  # KV heads must split (or replicate) over --tp-size
    except BaseException:
        if previous is None:
            environ.pop(ENV_VAR, None)
        else:
            environ[ENV_VAR] = previous
        raise
    return server_args, runtime


def _with_tca_memory_flags(rest: list[str], block: int) -> list[str]:
    """TCA's memory needs SGLang's pages to be its blocks and its own radix cache: add those flags unless given
    (other values are refused by the plugin's validation with a clear message)."""
    given = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
    if "--page-size" not in given:
        rest = [*rest, "--page-size", str(block)]
    if "--radix-cache-backend" not in given:
        rest = [*rest, "--radix-cache-backend", BACKEND]
    return rest


@contextlib.contextmanager
def _sglang_assertions():
    """SGLang checks many server arguments with bare asserts (`assert self.tp_size % self.dp_size == 0` prints as
    "AssertionError"): turn one into a CLIError naming the failed condition and the flags' values."""
    try:
        yield
    except AssertionError as e:
        raise CLIError(f"SGLang rejected the server arguments: {_describe_assertion(e)}") from None


def _describe_assertion(e: AssertionError) -> str:
    """The assertion's message, or else its condition; then the values of the flags it reads, and where it is."""
    msg = " ".join(str(e).split())
    if e.__traceback__ is None:
        return msg or "an assertion failed"
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = traceback.extract_tb(e.__traceback__)[-1]
    src = " ".join(linecache.getline(frame.filename, n).strip()
                   for n in range(frame.lineno, (frame.end_lineno or frame.lineno) + 1))
    owner = tb.tb_frame.f_locals.get("self")  # the ServerArgs being resolved
    values = [f"--{name.replace('_', '-')} {getattr(owner, name)}"
              for name in dict.fromkeys(re.findall(r"\bself\.([A-Za-z_]\w*)", src))
              if hasattr(owner, name) and not callable(getattr(owner, name))]
    cond = re.sub(r"\bself\.", "", re.sub(r"^assert\s*", "", src))
    what = msg or (f"it requires {cond}" if src.startswith("assert") else "an assertion failed")
    where = f"{Path(frame.filename).name}:{frame.lineno}"
    return f"{what} ({', '.join(values)}; {where})" if values else f"{what} ({where})"


def _serve(server_args, use_tca: bool) -> None:
    from sglang.srt.utils import kill_process_tree

    try:
        if use_tca:
            from sglang.srt.entrypoints.http_server import launch_server

            from patches import http_server_app
            from sglang_tca.plugin import run_scheduler_process

            http_server_app.install()                 # a non-object JSON body: 400, not SGLang's 500
            launch_server(server_args, run_scheduler_process_func=run_scheduler_process)
        else:
            from sglang.launch_server import run_server

            run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if isinstance(e, ValueError) else f"{type(e).__name__}: {msg}"


def main(argv: Sequence[str] | None = None, *, serve: Callable | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(_tca_parser().format_help())
        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args

        from sglang_tca.plugin import register

        load_plugins()
        register()  # before SGLang builds its parser, so that --attention-backend lists tca
        prepare_server_args(["--help"])  # prints SGLang's flags and exits 0
        return 0
    try:
        server_args, runtime = prepare(argv)
    except (CLIError, Exception) as e:  # noqa: BLE001 - bad input ends in one line, never a traceback
        if os.environ.get("SGLANG_TCA_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    (serve or _serve)(server_args, runtime is not None)
    return 0
