"""tq-chat on a tensor-parallel group (under `mlx.launch`): one conversation, the model and its KV cache
split over the processes.

Every rank runs the same Session on its shard of the model, in lockstep: rank 0 reads each input line
and broadcasts it, every rank carries out the same command (their collectives pair up), and only rank 0
prints.  Ranks other than 0 ignore Ctrl-C; on rank 0 Ctrl-C drops a line being typed, and during an answer
it ends the run on every rank (one rank cannot stop an answer mid-way alone: the others would wait in its
next collective).  `mlx.launch` never closes the ranks' stdin: end with /quit.
"""

import signal
import sys

from tq_mlx.models import distributed

from .commands import parse, read_message


def setup(group):
    """Shared sampling seeds; Ctrl-C ignored on ranks other than 0."""
    distributed.share_seed(group)
    if group.rank() != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def read_command(group, read=input):
    """The next command, read on rank 0 and the same on every rank; EOFError on all when rank 0's input ends."""
    text = None
    if group.rank() == 0:
        try:
            text = read_message(read)
        except EOFError:
            text = None
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            print()
            text = ""
    text = distributed.broadcast(text, group)
    if text is None:
        raise EOFError
    return parse(text)


def file_command(session, name, arg, out, group):
    """/save or /load on every rank, each its own file; a failure on some ranks is reported on rank 0, and
    a /load that succeeded on some ranks only clears the conversation everywhere (the ranks must agree)."""
    try:
        path = session.save(arg) if name == "save" else session.load(arg)
        error = None
    except ValueError as e:  # SessionFileError
        path, error = None, str(e)
        print(f"tq-chat{distributed.label(group)}: cannot {name}: {error}", file=sys.stderr)
    failed = [r for r, (ok,) in enumerate(distributed.gather_ints([error is None], group)) if not ok]
    if not failed:
        done = "saved" if name == "save" else "loaded"
        where = "to" if name == "save" else "from"
        print(
            f"[{done} {len(session.messages)} messages, {session.n_tokens} tokens {where} {path} and the other "
            f"ranks' files]",
            file=out,
        )
        return
    ranks = ", ".join(map(str, failed))
    if name == "load" and len(failed) < group.size():
        session.reset()
        print(f"[cannot load on rank(s) {ranks} (see stderr): the conversation was cleared on every rank]", file=out)
    else:
        print(f"[cannot {name} on rank(s) {ranks} (see stderr)]", file=out)
