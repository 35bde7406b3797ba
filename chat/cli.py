"""tq-chat: chat with a model in the terminal on a TurboQuant-compressed KV cache.

tq-chat                               # bundled SmolLM2-135M-Instruct, default KV preset
tq-chat --model gemma3-270m --kv k3v4 --max-tokens 512
python -m tq_mlx.chat.cli --help
"""

import argparse
import atexit
import signal
import sys
import time

import tq_mlx
from tq_mlx.models import distributed
from tq_mlx.models.watchdog import DEFAULT_TIMEOUT, Watchdog
from tq_mlx.models.watchdog import run_command as run_main

from . import tensor_parallel
from .commands import HELP, parse, read_message
from .sampling import Sampling
from .session import POLICIES, ContextFull, Session, SessionFileError

ERRORS = (OSError, ValueError, NotImplementedError)  # end tq-chat with one line on stderr
HISTORY_FILE = "chat_history"
HISTORY_NOTE = (
    "the lines you type are kept in $TQ_MLX_CACHE/chat_history (~/.cache/tq_mlx/chat_history by "
    "default) for up-arrow recall; --no-history turns that off."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tq-chat",
        description="Chat with an LLM on a TurboQuant-compressed KV cache (one persistent cache: "
        "each turn prefills only its new tokens).",
        epilog=HELP
        + "\n\nKV presets: auto (the default: k4v4 on Apple GPUs, k4v4-fast on a CPU), "
        + ", ".join(tq_mlx.PRESETS)
        + ", or kXvY (X, Y in 1..8).\n\nBase models (not instruction-tuned, such as the bundled "
        "gemma3-270m) run in completion mode: your text is continued, not answered.\n"
        f"Input history: {HISTORY_NOTE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="bundled alias (smollm2-135m, gemma3-270m), .gguf file, mlx-lm model dir or hub id "
        "(default: bundled SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--kv",
        default=tq_mlx.DEFAULT_PRESET,
        help=f"KV cache preset or explicit kXvY (default: {tq_mlx.DEFAULT_PRESET})",
    )
    p.add_argument(
        "--kv-window",
        type=int,
        default=None,
        metavar="N",
        help="keep the most recent N tokens in fp16 (default: the preset's)",
    )
    p.add_argument(
        "--kv-boundary-layers",
        type=int,
        default=None,
        metavar="N",
        help="keep the first and last N layers in fp16 (default: the preset's)",
    )
    p.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        metavar="N",
        help="sliding-window KV cache of N tokens, like mlx_lm (default: unbounded)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        metavar="N",
        help="most tokens a conversation may hold, answer included (default: the model's context length, else 8192)",
    )
    p.add_argument(
        "--on-context-full",
        choices=POLICIES,
        default="stop",
        help="when a turn would pass --max-context: refuse it (stop) or drop the oldest turns "
        "and re-encode the rest (drop-oldest); default: stop",
    )
    p.add_argument(
        "--max-tokens", "-m", type=int, default=256, metavar="N", help="most tokens per answer (default: 256)"
    )
    p.add_argument("--temp", type=float, default=0.0, metavar="T", help="sampling temperature (default: 0, greedy)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling top-p (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (default: 0, off)")
    p.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        metavar="P",
        help="drop tokens below P x the top probability (default: 0, off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        metavar="R",
        help="penalise recently generated tokens (e.g. 1.1; default: off)",
    )
    p.add_argument(
        "--repetition-context-size",
        type=int,
        default=20,
        metavar="N",
        help="tokens the repetition penalty looks back on (default: 20)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="random seed: answer i is sampled after mx.random.seed(SEED + i), so a conversation "
        "repeats exactly (also after /save and /load)",
    )
    p.add_argument("--system-prompt", default=None, metavar="TEXT", help="system prompt (default: the chat template's)")
    p.add_argument("--no-history", action="store_true", help="do not read or write the input history file")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="under mlx.launch: end every process with an error when a command shared with the other processes "
        f"makes no progress for this long (a stalled rank; default: {DEFAULT_TIMEOUT:g}; 0: never)",
    )
    return p


def setup_history():
    """Readline editing and history: """ + HISTORY_NOTE
    try:
        import readline
    except ImportError:
        return None
    from tq_mlx.models import cache_dir

    try:
        path = cache_dir() / HISTORY_FILE
        if path.exists():
            readline.read_history_file(str(path))
    except OSError:
        return None
    readline.set_history_length(1000)

    def save():
        try:
            readline.write_history_file(str(path))
        except OSError:
            pass

    atexit.register(save)
    return path


def _mib(b) -> str:
    return f"{b / 2**20:.2f} MiB"


def kv_summary(session: Session) -> str:
    """KV bytes held and how they compare with an fp16 cache of the same tokens."""
    s = session.stats()
    if not s["tokens"]:
        return "KV cache empty"
    ranks = "" if s["kv_bytes_per_rank"] is None else f" ({', '.join(map(_mib, s['kv_bytes_per_rank']))} per rank)"
    if s["ratio"] is None:
        return (
            f"KV {_mib(s['kv_bytes'])}{ranks}, uncompressed: tokens stay exact until the cache holds {s['quant_start']}"
        )
    return f"KV {_mib(s['kv_bytes'])}{ranks}, {s['ratio']:.2f}x smaller than fp16 ({_mib(s['fp16_bytes'])})"


def speed_line(session: Session) -> str:
    """One line after an answer, as mlx_lm.generate prints its speeds."""
    t = session.last
    return (
        f"[prompt: {t.prefill_tokens} tokens, {t.prefill_tps:.1f} tok/s | generation: {t.decode_tokens} "
        f"tokens, {t.decode_tps:.1f} tok/s | first token {t.ttft:.2f} s | {kv_summary(session)}]"
    )


def print_stats(session: Session, out=sys.stdout):
    s, last = session.stats(), session.last
    print(f"tokens in context: {s['tokens']} (limit {s['max_context']}); KV preset {s['kv']}", file=out)
    print(kv_summary(session), file=out)
    print(f"layers: {s['layers']}", file=out)
    if last.finish:
        print(
            f"last turn: {speed_line(session)[1:-1]} ({last.finish}); peak memory {last.peak_memory / 1e9:.3f} GB",
            file=out,
        )


def answer(session: Session, text: str, out=sys.stdout, beat=None):
    """Stream the answer to `text`; Ctrl-C stops it after the current token (in a group it ends the run:
    see tensor_parallel.py).  beat(): called after each chunk of text (a watchdog's)."""
    try:
        plan = session.prepare(text)
    except ContextFull as e:
        print(f"[{e}]", file=out)
        return
    if plan.dropped_turns:
        print(f"[context full: dropped the {plan.dropped_turns} oldest turn(s) and re-encoding the rest]", file=out)

    def on_sigint(*_):
        if session.stop_requested:  # a second Ctrl-C: stop now (the cache is re-encoded next turn)
            raise KeyboardInterrupt
        session.stop()

    previous = signal.signal(signal.SIGINT, on_sigint) if session.group is None else None
    chunks = session.generate(plan)
    try:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
            if beat is not None:
                beat()
    except KeyboardInterrupt:
        if session.group is not None:  # the other ranks are mid-answer: the run ends (tensor_parallel.py)
            raise
    finally:
        chunks.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    print(file=out)
    if session.last.finish == "interrupted" and not session.last.decode_tokens:
        print("[interrupted before the answer began: the message was dropped]", file=out)
    elif session.last.finish == "interrupted":
        print("[interrupted]", file=out)
    elif session.last.finish == "length":
        print(f"[stopped at --max-tokens {session.max_tokens}]", file=out)
    if session.last.decode_tokens:
        print(speed_line(session), file=out)


def run_command(session: Session, cmd, out=sys.stdout, beat=None) -> bool:
    """Carry out one parsed command; False means quit.  beat: see `answer`."""
    name, arg = cmd
    if name in ("save", "load") and session.group is not None:
        tensor_parallel.file_command(session, name, arg, out, session.group)
    elif name == "quit":
        return False
    if name in ("help", "unknown"):
        if name == "unknown":
            print(f"unknown command: {arg}", file=out)
        print(HELP, file=out)
    elif name == "error":
        print(arg, file=out)
    elif name == "reset":
        session.reset()
        print("[conversation cleared]", file=out)
    elif name == "stats":
        print_stats(session, out)
    elif name == "kv":
        if not arg:
            print(f"KV preset: {session.config.name}; presets: {', '.join(tq_mlx.PRESETS)}, or kXvY", file=out)
        else:
            try:
                session.set_kv(arg)
            except ValueError as e:
                print(e, file=out)
            else:
                print(f"[KV preset {session.config.name}: re-encoded {session.n_tokens} tokens]", file=out)
    elif name == "system":
        if not arg:
            print(f"system prompt: {session.system or '(the chat template default)'}", file=out)
        else:
            session.set_system(arg)
            print(f"[system prompt set: re-encoded {session.n_tokens} tokens]", file=out)
    elif name == "save":
        try:
            path = session.save(arg)
        except SessionFileError as e:
            print(f"cannot save: {e}", file=out)
        else:
            print(f"[saved {len(session.messages)} messages, {session.n_tokens} tokens to {path}]", file=out)
    elif name == "load":
        try:
            path = session.load(arg)
        except SessionFileError as e:
            print(f"cannot load: {e}", file=out)
        else:
            print(f"[loaded {len(session.messages)} messages, {session.n_tokens} tokens from {path}]", file=out)
    elif name == "say":
        answer(session, arg, out, beat)
    return True


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tq_mlx.resolve_config(args.kv)
        sampling = Sampling(
            args.temp, args.top_p, args.top_k, args.min_p, args.repetition_penalty, args.repetition_context_size
        )
    except ValueError as e:
        parser.error(str(e))
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    group = distributed.world()
    where = distributed.label(group)
    dog = Watchdog(args.dist_timeout, "tq-chat", where)
    try:
        with distributed.rank0_output(group):
            return run_main("tq-chat", where, lambda: chat(args, group, dog, sampling), ERRORS)
    finally:
        dog.close()


def load_session(args, group, sampling) -> Session:
    """The model (sharded over `group` when it has several processes) and a Session on it."""
    from tq_mlx.models import DEFAULT_MODEL, bundled, load

    name = args.model or DEFAULT_MODEL
    print(f"Loading {name} ...", flush=True)
    tic = time.perf_counter()
    model, tokenizer = load(args.model)
    if group.size() > 1:
        distributed.shard_model(model, group)
        tensor_parallel.setup(group)
    completion = None if name not in bundled.INSTRUCTION_TUNED else not bundled.INSTRUCTION_TUNED[name]
    session = Session(
        model,
        tokenizer,
        args.kv,
        system_prompt=args.system_prompt,
        max_tokens=args.max_tokens,
        sampling=sampling,
        completion=completion,
        seed=args.seed,
        max_context=args.max_context,
        max_kv_size=args.max_kv_size,
        kv_window=args.kv_window,
        kv_boundary_layers=args.kv_boundary_layers,
        on_context_full=args.on_context_full,
        model_name=name,
        group=group,
    )
    where = f" from {bundled.describe(name)}" if name in bundled.BUNDLED else ""
    split = f", sharded over {group.size()} processes" if group.size() > 1 else ""
    quit_with = "Ctrl-D" if group.size() == 1 else "/quit"
    print(
        f"Loaded {name}{where} in {time.perf_counter() - tic:.1f}s{split}; KV cache {session.config.name}, "
        f"context {session.max_context} tokens. /help for commands, {quit_with} to quit.",
        flush=True,
    )
    if session.completion:
        print(
            f"Note: {name} is a base model (not instruction-tuned, or no chat template): completion mode, "
            "your text is continued, not answered.",
            flush=True,
        )
    return session


def chat(args, group, dog, sampling):
    """The conversation loop (see tensor_parallel.py for a group of several processes)."""
    session = load_session(args, group, sampling)
    if not args.no_history and group.size() == 1:
        setup_history()
    while True:
        try:
            cmd = parse(read_message(input)) if group.size() == 1 else tensor_parallel.read_command(group)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            print()
            continue
        if cmd is None:
            continue
        with dog.armed():
            if not run_command(session, cmd, beat=dog.beat):
                return


if __name__ == "__main__":
    sys.exit(main())
