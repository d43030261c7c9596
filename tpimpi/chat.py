"""A multi-turn conversation held on rank 0, the KV cache keeping the history between turns.

    mpirun --output :raw -np 4 python -m tpimpi.generate --chat

Rank 0 alone reads the user's lines and renders the conversation through the model's chat template;
the other ranks only learn that a turn starts (and then run the decode loop) or that the chat ends.
Each turn feeds only what the cache does not hold yet: the previous rendering plus the answer are a
token-prefix of the new rendering for ordinary templates; where a template rewrites earlier turns,
the cache is recomputed from the first token that differs.
"""

from __future__ import annotations

import os
import select
import sys

import numpy as np

from . import stdin
from .engine import collective
from .errors import TpimpiError, UsageError

CMD_END, CMD_TURN = 0, 1
IDLE_POLL_S = 0.25  # how often a quiet standard input is checked for having ended
IDLE_END_S = 2.0  # a piped input that stays quiet this long, where its end cannot be seen, has ended
HELP = "Type a message and press Enter. /reset starts a new conversation, /exit ends the chat."


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatInput:
    """The user's lines on rank 0, and the end of input even where mpirun never forwards it."""

    def __init__(self, launched: bool, terminal: bool):
        self.launched, self.terminal = launched, terminal
        self.launcher = stdin.launcher_input() if launched else None  # None: mpirun's input cannot be seen
        self._buf = b""
        self._ended = False

    def _launcher_ended(self) -> bool | None:
        """Whether mpirun has read all of its input (Open MPI 5.0 never forwards the end); None: cannot tell."""
        if self.launcher is None or self.launcher.kind == "other":
            return None
        return self.launcher.ended()

    def readline(self) -> str | None:
        """The next line without its newline, or None at the end of input."""
        while b"\n" not in self._buf and not self._ended:
            self._fill()
        if b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
        elif self._buf:
            line, self._buf = self._buf, b""
        else:
            return None
        return line.decode("utf-8", "replace").rstrip("\r")

    def _fill(self) -> None:
        fd = sys.stdin.fileno()
        if not self.launched:  # a plain process gets the real end of input
            data = os.read(fd, 1 << 16)
            self._buf += data
            self._ended = not data
            return
        quiet = 0.0
        while True:
            ready, _, _ = select.select([fd], [], [], IDLE_POLL_S)
            if ready:
                data = os.read(fd, 1 << 16)
                self._buf += data
                self._ended = not data
                return
            quiet += IDLE_POLL_S
            ended = self._launcher_ended()
            if ended or (ended is None and not self.terminal and quiet >= IDLE_END_S):
                # the launcher has read everything: give what it forwarded a moment to arrive
                ready, _, _ = select.select([fd], [], [], IDLE_POLL_S)
                if ready:
                    continue
                self._ended = True
                return


class Conversation:
    """Rank 0's side of a chat: the messages, and the token ids whose keys and values the cache holds."""

    def __init__(self, tok, max_seq: int, system: str | None = None):
        self.tok, self.max_seq, self.system = tok, max_seq, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.cached: list[int] = []  # ids at cache positions 0..len-1

    def turn(self, user_text: str) -> tuple[list[int], int]:
        """(the whole conversation's ids with the new user message, how many of them the cache holds)."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        ids = self.tok.encode_chat(messages)
        if len(ids) >= self.max_seq:
            raise UsageError(f"the conversation would be {len(ids)} tokens and the context holds {self.max_seq}: "
                             f"type /reset to start a new one (or raise --max-seq-len)")
        # the cache holds ids up to the first that differs; at least one id must be fed to get logits
        return ids, min(common_prefix(self.cached, ids), len(ids) - 1)

    def answered(self, user_text: str, ids: list[int], result: dict) -> None:
        """Record the user message and the answer; the cache now holds the positions the loop fed."""
        self.messages += [{"role": "user", "content": user_text},
                          {"role": "assistant", "content": result["text"]}]
        self.cached = (ids + result["token_ids"])[: result["positions"]]


def chat(comm, eng, samp, max_new: int, system: str | None, stop: tuple[str, ...], launched: bool) -> int:
    """Every rank: hold a conversation until /exit or the end of input. Rank 0 talks to the user."""
    ctrl = np.zeros(1, dtype=np.int64)  # [command]
    talk = collective(comm, lambda: _RankZero(eng, system, launched) if comm.rank == 0 else None)
    while True:
        ids, start = talk.next_turn() if comm.rank == 0 else (None, 0)
        comm.barrier()  # the workers sleep here while the user types
        ctrl[0] = CMD_TURN if ids is not None else CMD_END
        comm.bcast_(ctrl)
        if ctrl[0] == CMD_END:
            return 0
        result = eng.generate(ids, samp, max_new, stream=True, start_pos=start, stop=stop)
        if comm.rank == 0:
            talk.after_turn(ids, start, result)


class _RankZero:
    """The user's side of the chat: reading lines, commands, and the messages around the answers."""

    def __init__(self, eng, system: str | None, launched: bool):
        if not eng.tok.has_chat_template:
            raise UsageError("--chat needs a model with a chat template; this one has none (use --raw --prompt)")
        self.terminal = terminal = stdin.is_terminal(launched)
        self.conv = Conversation(eng.tok, eng.max_seq, system)
        self.lines = ChatInput(launched, terminal)
        if terminal:
            print(HELP, file=sys.stderr, flush=True)

    def _say(self, text: str) -> None:
        print(f"[{text}]", file=sys.stderr, flush=True)

    def next_turn(self) -> tuple[list[int] | None, int]:
        """The next turn's (ids, cached count), or (None, 0) when the chat ends."""
        while True:
            if self.terminal:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = self.lines.readline()
            command = line.strip() if line is not None else "/exit"  # the end of input ends the chat
            if command in ("/exit", "/quit"):
                return None, 0
            if command == "/reset":
                self.conv.reset()
                self._say("new conversation")
                continue
            if command == "/help":
                self._say(HELP)
                continue
            if not command:
                continue
            try:
                ids, start = self.conv.turn(line)
                self.user_text = line
                return ids, start
            except TpimpiError as e:  # the conversation is too long for the context, or the template refused it
                self._say(str(e))

    def after_turn(self, ids: list[int], start: int, result: dict) -> None:
        self.conv.answered(self.user_text, ids, result)
        if result["stop_reason"] == "context_full":
            self._say(f"the context of {self.conv.max_seq} tokens is full: type /reset to start a new conversation")
        elif self.terminal:
            n = len(result["token_ids"])
            self._say(f"{len(ids) - start} new prompt tokens ({start} kept in the cache), {n} generated, "
                      f"{result['decode_tokens_per_s'] or 0:.1f} tokens/s")
