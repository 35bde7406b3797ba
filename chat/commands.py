"""Input handling for tq-chat: slash commands and multi-line messages (no model, no I/O of its own)."""

from collections.abc import Callable
from typing import NamedTuple

PROMPT = ">> "
CONTINUE = "... "
BLOCK = '"""'

COMMANDS = {
    "help": "/help              show this help",
    "reset": "/reset             forget the conversation (keeps the system prompt)",
    "stats": "/stats             tokens in context, KV bytes vs fp16, last turn's speed, peak memory",
    "kv": "/kv [PRESET]       show or switch the KV preset (re-encodes the conversation)",
    "save": "/save FILE         save the session (messages + KV cache) to FILE.safetensors",
    "load": "/load FILE         load a saved session (same model and KV preset)",
    "system": "/system [TEXT]     show or set the system prompt (re-encodes the conversation)",
    "quit": "/quit              exit (also /exit, Ctrl-D)",
}
_ALIASES = {"exit": "quit", "q": "quit", "h": "help", "?": "help"}
_NEEDS_ARG = {"save": "FILE", "load": "FILE"}

HELP = "\n".join(
    [
        "Commands:",
        *(f"  {line}" for line in COMMANDS.values()),
        "",
        "Input:",
        "  end a line with \\ to continue the message on the next line;",
        f"  or start a block with {BLOCK} and end it with {BLOCK} (on its own line or at a line's end);",
        "  start a message with // to send text that begins with /.",
        "  Ctrl-C stops an answer (the partial answer stays in the conversation); Ctrl-D exits.",
    ]
)


class Command(NamedTuple):
    """A parsed input: name is a command, "say" (a message), "unknown" or "error"; arg is its text."""

    name: str
    arg: str = ""


def parse(text: str) -> Command | None:
    """The Command for one input; None for empty input."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("//"):
        return Command("say", text[1:])
    if not text.startswith("/"):
        return Command("say", text)
    head, *rest = text[1:].split(None, 1) or [""]
    name = _ALIASES.get(head.lower(), head.lower())
    arg = rest[0].strip() if rest else ""
    if name not in COMMANDS:
        return Command("unknown", text)
    if name in _NEEDS_ARG and not arg:
        return Command("error", f"usage: /{name} {_NEEDS_ARG[name]}")
    return Command(name, arg)


def read_message(read: Callable[[str], str]) -> str:
    """One message from `read(prompt)` (e.g. `input`): a line, continued while it ends with a
    backslash, or a block between triple quotes.  EOFError from `read` propagates."""
    line = read(PROMPT)
    if line.lstrip().startswith(BLOCK):
        first = line.lstrip()[len(BLOCK) :]
        if first.rstrip().endswith(BLOCK):
            return first.rstrip()[: -len(BLOCK)]
        lines = [first] if first.strip() else []
        while True:
            line = read(CONTINUE)
            if line.rstrip().endswith(BLOCK):
                last = line.rstrip()[: -len(BLOCK)]
                if last:
                    lines.append(last)
                return "\n".join(lines)
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read(CONTINUE)
    lines.append(line)
    return "\n".join(lines)
