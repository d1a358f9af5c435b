"""`offload chat` in a real terminal: a pseudo-terminal, real SIGINTs, the transcript on disk.

Ctrl-C at the waiting prompt, at the moment a reply ends and in the middle of a reply must each leave the
session running with every turn saved; `--resume` must continue the saved conversation."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from offload.demo import random_demo_checkpoint

DEADLINE = 120.0  # seconds: a safety net against a hung child, far above what a step takes
LEAVE_GAP = 1.2  # seconds between two Ctrl-C that must not count as the pair that leaves (1 s)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return random_demo_checkpoint(tmp_path_factory.mktemp("cache"))


class Terminal:
    """A child process on a pseudo-terminal: write keystrokes, wait for text, send signals."""

    def __init__(self, args: list[str]):
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "COLUMNS": "200"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.master, self.seen = master, ""

    def expect(self, text: str) -> str:
        """Everything up to and including the next `text`."""
        deadline = time.monotonic() + DEADLINE
        while text not in self.seen:
            assert self.proc.poll() is None or self._read(0.1), \
                f"the chat exited ({self.proc.returncode}) before printing {text!r}:\n{self.seen}"
            assert time.monotonic() < deadline, f"no {text!r} after {DEADLINE} s:\n{self.seen}"
            self._read(0.5)
        before, _, self.seen = self.seen.partition(text)
        return before + text

    def _read(self, timeout: float) -> bool:
        if not select.select([self.master], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # the child closed the terminal
            return False
        self.seen += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode("utf-8", "replace")).replace("\r", "")
        return bool(data)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def exit_code(self) -> int:
        code = self.proc.wait(timeout=DEADLINE)
        os.close(self.master)
        return code


# confirm_ctrl_c: readline notices a SIGINT that arrives between printing the prompt and waiting for keys only
# at the next key, so each Ctrl-C at a prompt is followed by an empty line: the SIGINT discards it, and where
# the SIGINT was handled first, an empty line is ignored. Either way one hint and a fresh prompt follow.


def chat(demo_dir, *args: str) -> Terminal:
    return Terminal([sys.executable, "-m", "offload.cli", "chat", str(demo_dir), "--device", "cpu",
                     "--temperature", "0", *args])


def saved_messages(path) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in json.loads(path.read_text(encoding="utf-8"))["messages"]]


def test_ctrl_c_at_the_prompt_and_as_a_reply_ends_keeps_the_session(demo_dir, tmp_path):
    transcript = tmp_path / "chat.json"
    term = chat(demo_dir, "--max-new-tokens", "4", "--transcript", str(transcript))
    term.expect(f"saved to {transcript}")
    term.expect("you> ")
    term.interrupt()  # at the waiting prompt
    term.send("\n")  # see confirm_ctrl_c
    term.expect("Ctrl-C again within a second")
    term.expect("you> ")
    time.sleep(LEAVE_GAP)  # so that the next Ctrl-C is not the second of a pair
    term.send("hello\n")
    term.expect("finish: ")
    term.interrupt()  # the instant the reply ends: it clears the next prompt's line, as at any prompt
    term.send("\n")
    term.expect("Ctrl-C again within a second")
    term.expect("you> ")
    term.send("again\n")
    term.expect("finish: ")
    term.expect("you> ")
    term.send("\x04")  # Ctrl-D leaves
    term.expect("the conversation is saved in")
    assert term.exit_code() == 0
    assert [role for role, _ in saved_messages(transcript)] == ["user", "assistant"] * 2
    assert [text for role, text in saved_messages(transcript) if role == "user"] == ["hello", "again"]


def test_ctrl_c_mid_reply_keeps_the_partial_reply_and_resume_continues(demo_dir, tmp_path):
    transcript = tmp_path / "chat.json"
    transcript.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]}))
    term = chat(demo_dir, "--max-new-tokens", "3000", "--max-context", "4096", "--resume", str(transcript))
    term.expect("resumed 1 turn from")
    term.expect("you> ")
    term.send("Tell me a long story.\n")
    term.expect("assistant> ")
    term.interrupt()  # while the 3000-token reply is being generated
    term.expect("finish: interrupted")
    term.expect("you> ")
    term.send("/exit\n")
    assert term.exit_code() == 0
    messages = saved_messages(transcript)
    assert messages[:3] == [("user", "hi"), ("assistant", "hello"), ("user", "Tell me a long story.")]
    assert len(messages) == 4 and messages[3][0] == "assistant"

