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

from .commands import HELP, parse, read_message
from .session import POLICIES, ContextFull, Session, SessionFileError

HISTORY_FILE = "chat_history"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tq-chat",
        description="Chat with an LLM on a TurboQuant-compressed KV cache (one persistent cache: "
        "each turn prefills only its new tokens).",
        epilog=HELP + "\n\nKV presets: " + ", ".join(tq_mlx.PRESETS) + ", or kXvY (X, Y in 1..8).",
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
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="random seed: answer i is sampled after mx.random.seed(SEED + i), so a conversation "
        "repeats exactly (also after /save and /load)",
    )
    p.add_argument("--system-prompt", default=None, metavar="TEXT", help="system prompt (default: the chat template's)")
    return p


def setup_history():
    """Readline editing and history in $TQ_MLX_CACHE/chat_history (~/.cache/tq_mlx by default)."""
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


def print_stats(session: Session, out=sys.stdout):
    s, last = session.stats(), session.last
    print(f"tokens in context: {s['tokens']} (limit {s['max_context']})", file=out)
    print(
        f"KV cache ({s['kv']}): {s['kv_bytes']} bytes held; fp16 would hold {s['fp16_bytes']} bytes "
        f"(compression {s['ratio']:.2f}x)",
        file=out,
    )
    if last.finish:
        decode = f"{last.decode_tps:.1f} tok/s" if last.decode_tokens > 1 else "n/a"
        print(
            f"last turn: prefill {last.prefill_tokens} tokens at {last.prefill_tps:.1f} tok/s, "
            f"decode {last.decode_tokens} tokens at {decode} ({last.finish})",
            file=out,
        )
    print(f"peak memory: {s['peak_memory'] / 1e9:.3f} GB", file=out)


def answer(session: Session, text: str, out=sys.stdout):
    """Stream the answer to `text`; Ctrl-C stops it after the current token."""
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

    previous = signal.signal(signal.SIGINT, on_sigint)
    chunks = session.generate(plan)
    try:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        chunks.close()
        signal.signal(signal.SIGINT, previous)
    print(file=out)
    if session.last.finish == "interrupted" and not session.last.decode_tokens:
        print("[interrupted before the answer began: the message was dropped]", file=out)
    elif session.last.finish == "interrupted":
        print("[interrupted]", file=out)
    elif session.last.finish == "length":
        print(f"[stopped at --max-tokens {session.max_tokens}]", file=out)


def run_command(session: Session, cmd, out=sys.stdout) -> bool:
    """Carry out one parsed command; False means quit."""
    name, arg = cmd
    if name == "quit":
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
        except OSError as e:
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
        answer(session, arg, out)
    return True


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tq_mlx.resolve_config(args.kv)
    except ValueError as e:
        parser.error(str(e))
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    from tq_mlx.models import DEFAULT_MODEL, load

    name = args.model or DEFAULT_MODEL
    print(f"Loading {name} ...", flush=True)
    tic = time.perf_counter()
    try:
        model, tokenizer = load(args.model)
        session = Session(
            model,
            tokenizer,
            args.kv,
            system_prompt=args.system_prompt,
            max_tokens=args.max_tokens,
            temp=args.temp,
            top_p=args.top_p,
            seed=args.seed,
            max_context=args.max_context,
            max_kv_size=args.max_kv_size,
            kv_window=args.kv_window,
            kv_boundary_layers=args.kv_boundary_layers,
            on_context_full=args.on_context_full,
            model_name=name,
        )
    except (OSError, ValueError, NotImplementedError) as e:
        print(f"tq-chat: {e}", file=sys.stderr)
        return 1
    print(
        f"Loaded {name} in {time.perf_counter() - tic:.1f}s; KV cache {session.config.name}, "
        f"context {session.max_context} tokens. /help for commands, Ctrl-D to quit.",
        flush=True,
    )
    setup_history()
    while True:
        try:
            cmd = parse(read_message(input))
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            print()
            continue
        if cmd is not None and not run_command(session, cmd):
            return 0


if __name__ == "__main__":
    sys.exit(main())
