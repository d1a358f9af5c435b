"""The chat logic without a terminal: trimming, input assembly, commands, saving, and the loop with scripted input."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import stat

import pytest
from rich.console import Console

import offload
from offload.chat import (ChatLoop, ChatSession, Command, CtrlC, MessageReader, Transcript, parse_command,
                          parse_transcript, read_transcript, stats_line, turns_to_drop)
from offload.files import write_json_atomic
from offload.demo import random_demo_checkpoint
from offload.errors import ContextLengthError, OffloadError
from offload.generate import Generation, GenerationStats


@pytest.mark.parametrize("fixed, turns, budget, expected", [
    (10, [5, 5, 5], 30, 0),  # everything fits
    (10, [5, 5, 5], 25, 0),  # exactly fits
    (10, [5, 5, 5], 24, 1),  # one over: drop the oldest
    (10, [8, 1, 1], 13, 1),  # dropping the big oldest turn is enough
    (10, [1, 1, 8], 13, 3),  # the newest turn is the big one: everything goes
    (10, [5, 5, 5], 10, 3),  # only the new message fits
    (10, [], 10, 0),
    (11, [5, 5, 5], 10, None),  # the new message alone does not fit
    (11, [], 10, None),
])
def test_turns_to_drop(fixed, turns, budget, expected):
    assert turns_to_drop(fixed, turns, budget) == expected


def test_message_reader_joins_continued_lines_and_blocks():
    reader = MessageReader()
    assert reader.feed("plain") == "plain" and not reader.continuing
    assert reader.feed("first \\") is None and reader.continuing
    assert reader.feed("second\\") is None
    assert reader.feed("third") == "first \nsecond\nthird"
    assert reader.feed('"""') is None and reader.continuing
    assert reader.feed("a line ending in \\") is None  # inside a block a backslash is text
    assert reader.feed("") is None
    assert reader.feed('  """ ') == "a line ending in \\\n"
    assert not reader.continuing


def test_parse_command():
    assert parse_command("hello") is None
    assert parse_command("/reset") == Command("/reset")
    assert parse_command("/save  my chat.json ") == Command("/save", "my chat.json")
    assert parse_command("//etc is a folder") is None  # a message that starts with /
    assert parse_command("/stats\nmore") is None  # multi-line messages are never commands
    with pytest.raises(OffloadError, match="unknown command /nope"):
        parse_command("/nope")


def words(messages):
    """A stand-in tokenizer: one token per word, two per message for its template, one for the reply prompt."""
    return sum(len(m["content"].split()) + 2 for m in messages) + 1


def reply(text: str) -> Generation:
    return Generation(text=text, token_ids=[0] * len(text.split()), finish_reason="stop",
                      stats=GenerationStats(prompt_tokens=1, generated_tokens=len(text.split())))


def test_session_drops_oldest_turns_and_keeps_the_system_prompt():
    # Budget 30 - 10 = 20 prompt tokens. System "be brief" costs 4, a turn of 1 + 2 words costs 3 + 4 = 7.
    session = ChatSession(words, max_context=30, max_new_tokens=10, system="be brief")
    for i in range(3):
        messages, dropped = session.prompt(f"q{i}")
        session.add_turn(f"q{i}", reply(f"a{i} a{i}"))
    assert dropped == 1  # 4 + 3 + 1 + 2*7 = 22 > 20 before the third question: q0 went
    assert [(t.user, t.tokens) for t in session.context_turns] == [("q1", 7), ("q2", 7)]
    messages, dropped = session.prompt("q3 with more words")  # 4 + 6 + 1 = 11 fixed, room for one turn
    assert dropped == 1
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2 a2"},
        {"role": "user", "content": "q3 with more words"},
    ]
    assert words(messages) <= session.budget
    # Trimming shortened the prompt, not the transcript: every turn is still there to save.
    assert [t.user for t in session.turns] == ["q0", "q1", "q2"]
    assert session.to_json() == {"messages": [
        {"role": "system", "content": "be brief"},
        *[m for i in range(3) for m in ({"role": "user", "content": f"q{i}"},
                                        {"role": "assistant", "content": f"a{i} a{i}"})],
    ], "context_start": 2}


def test_session_rejects_a_message_that_cannot_fit_and_keeps_its_history():
    session = ChatSession(words, max_context=20, max_new_tokens=10, system="sys")
    session.prompt("hi")
    session.add_turn("hi", reply("hello"))
    with pytest.raises(ContextLengthError, match="max_context=20"):
        session.prompt("far " * 20)
    assert [t.user for t in session.turns] == ["hi"]


def test_session_checks_the_exact_count_when_the_template_is_not_additive():
    # This template charges 5 extra tokens whenever the prompt holds an assistant message: a turn measured at
    # the end of the conversation costs less than it turns out to while older turns are still there.
    def lumpy(messages):
        return words(messages) + (5 if any(m["role"] == "assistant" for m in messages) else 0)

    session = ChatSession(lumpy, max_context=27, max_new_tokens=10)
    for text in ("one", "two"):
        session.prompt(text)
        session.add_turn(text, reply("ok"))
    assert [t.tokens for t in session.turns] == [11, 6]
    # The plan keeps the second turn: 9 + 6 = 15 <= 17. Its exact count is 20, so it goes too.
    messages, dropped = session.prompt("three four five six seven eight")
    assert dropped == 2
    assert messages == [{"role": "user", "content": "three four five six seven eight"}]


def test_reset_keeps_the_system_prompt_and_the_transcript():
    session = ChatSession(words, max_context=100, max_new_tokens=10, system="sys")
    session.prompt("hi")
    session.add_turn("hi", reply("hello"))
    session.reset()
    assert session.messages() == [{"role": "system", "content": "sys"}] and session.last is None
    assert session.to_json()["messages"][1:] == [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]


def test_a_saved_conversation_restores_what_the_model_saw():
    session = ChatSession(words, max_context=30, max_new_tokens=10, system="be brief")
    for i in range(4):
        session.prompt(f"q{i}")
        session.add_turn(f"q{i}", reply(f"a{i} a{i}"))
    saved = parse_transcript(json.loads(json.dumps(session.to_json())), "chat.json")
    assert saved == Transcript("be brief", [(f"q{i}", f"a{i} a{i}") for i in range(4)], session.context_start)
    restored = ChatSession(words, max_context=30, max_new_tokens=10)
    restored.restore(saved)
    assert restored.to_json() == session.to_json()
    assert restored.prompt("next") == session.prompt("next")
    assert [(t.user, t.tokens) for t in restored.context_turns] == [(t.user, t.tokens) for t in session.context_turns]


@pytest.mark.parametrize("data, problem", [
    ([], "no list of messages"),
    ({"messages": [{"role": "user"}]}, "no list of messages"),
    ({"messages": [{"role": "user", "content": "a"}]}, "must alternate user, assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "must alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "context_start": 2},
     "context_start must be a turn index from 0 to 1"),
])
def test_a_file_that_is_not_a_saved_conversation_is_one_clear_error(data, problem):
    with pytest.raises(OffloadError, match=problem):
        parse_transcript(data, "x.json")


def test_read_transcript_names_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(OffloadError, match="cannot read .*missing.json"):
        read_transcript(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OffloadError, match="bad.json is not JSON"):
        read_transcript(tmp_path / "bad.json")


def test_ctrl_c_outside_an_armed_section_waits_for_the_next_one_and_twice_means_leave():
    now = [100.0]
    ctrl_c = CtrlC(clock=lambda: now[0])
    ctrl_c.on_signal(signal.SIGINT, None)  # between sections: nothing raised now
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c.armed():
            pytest.fail("a waiting Ctrl-C raises as the next section opens")
    now[0] += 1.5
    with ctrl_c.armed():  # it acted once; inside a section a press raises at once
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.on_signal(signal.SIGINT, None)
    assert not ctrl_c.leaving  # 1.5 s after the last press
    now[0] += 0.9
    ctrl_c.on_signal(signal.SIGINT, None)
    assert ctrl_c.leaving
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c.armed():
            pytest.fail("once leaving, every section raises")


def test_write_json_atomic_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "chat.json"
    write_json_atomic(path, {"messages": [{"role": "user", "content": "héllo"}]})
    assert json.loads(path.read_text(encoding="utf-8"))["messages"][0]["content"] == "héllo"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"messages": object()})  # fails halfway through writing
    assert json.loads(path.read_text(encoding="utf-8"))["messages"][0]["content"] == "héllo"
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]
    with pytest.raises(OffloadError, match="cannot write .*missing"):
        write_json_atomic(tmp_path / "missing" / "chat.json", {})
    with pytest.raises(OffloadError, match="cannot write"):
        write_json_atomic(tmp_path, {})  # a folder
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]


def test_stats_line_names_tokens_speed_and_finish():
    g = Generation(text="x", token_ids=[1, 2, 3], finish_reason="stop",
                   stats=GenerationStats(prompt_tokens=4, generated_tokens=3, prefill_seconds=0.5, decode_seconds=1.0))
    assert stats_line(g) == "3 tokens, prefill 8.0 tok/s, decode 2.0 tok/s, finish: stop"
    assert stats_line(g, 0.875) == "3 tokens, prefill 8.0 tok/s, decode 2.0 tok/s, expert hit rate 88%, finish: stop"


# The loop, on the demo model, with scripted input and recorded output.

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return offload.load(random_demo_checkpoint(tmp_path_factory.mktemp("cache")), device="cpu", max_context=256)


SIGINT = "SIGINT"  # a Script entry: Ctrl-C while the prompt waits


class Script:
    """read_line from a list; each entry is a line, SIGINT (delivered through the real signal), or an exception
    to raise at that point."""

    def __init__(self, *lines):
        self.lines = list(lines)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if line is SIGINT:
            signal.raise_signal(signal.SIGINT)  # Python runs the handler before the next line, as during input()
        if isinstance(line, BaseException):
            raise line
        return line


def make_loop(model, script, max_new_tokens=8, system=None, transcript=None, ctrl_c=None, max_context=None):
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(lambda m: len(model.chat_prompt(m)), max_context or model.max_context, max_new_tokens,
                          system)
    errors: list[str] = []
    loop = ChatLoop(model, session, dict(max_new_tokens=max_new_tokens, temperature=0.0), Console(file=out, width=200),
                    Console(file=err, width=200), script, lambda e: errors.append(str(e)), transcript=transcript,
                    ctrl_c=ctrl_c)
    return loop, session, out, err, errors


def test_loop_runs_commands_and_replies(model, tmp_path):
    script = Script("hello", "/stats", "two \\", "lines", "/save " + str(tmp_path / "c.json"), "/reset", "/stats",
                    "/exit", "never read")
    loop, session, out, err, errors = make_loop(model, script, system="Be brief.")
    loop.run()
    assert script.lines == ["never read"]
    assert script.prompts.count("...> ") == 1
    expected = model.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
                          max_new_tokens=8)
    assert f"assistant> {expected.text}\n" in out.getvalue()
    assert "prompt tokens" in out.getvalue() and "finish" in out.getvalue()
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert saved["messages"][3]["content"] == "two \nlines"
    assert saved["messages"][2]["content"] == expected.text
    assert errors == ["no reply yet; /stats shows the last reply's statistics"]  # after /reset
    assert session.messages() == [{"role": "system", "content": "Be brief."}]
    assert "saved 2 turns" in err.getvalue() and "conversation cleared" in err.getvalue()


def test_an_error_in_a_turn_does_not_end_the_session(model):
    script = Script("word " * 300, "/bogus", "hi")
    loop, session, out, err, errors = make_loop(model, script)
    loop.run()  # ends at end of input
    assert "max_context=256" in errors[0] and "unknown command /bogus" in errors[1]
    assert [t.user for t in session.turns] == ["hi"]


class Ticks:
    """A clock for CtrlC that moves `step` seconds at every reading."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_ctrl_c_stops_the_reply_and_keeps_it(model, monkeypatch):
    """KeyboardInterrupt raised while the reply streams, as Ctrl-C would, after the run produced a third piece
    that was never printed; then Ctrl-C at the prompt, which clears the line and stays."""
    real_stream = model.chat_stream
    runs = []

    class InterruptedRun:
        def __init__(self, run):
            self.run, self.result, self.pieces = run, run.result, 0
            runs.append(self)

        def __next__(self):
            piece = next(self.run)
            self.pieces += 1
            if self.pieces == 3:
                signal.raise_signal(signal.SIGINT)
            return piece

        def close(self):
            self.run.close()

    monkeypatch.setattr(model, "chat_stream", lambda messages, **kw: InterruptedRun(real_stream(messages, **kw)))
    script = Script("hello", "again", SIGINT, "/exit", "never read")
    loop, session, out, err, errors = make_loop(model, script, max_new_tokens=60, ctrl_c=CtrlC(clock=Ticks(10.0)))
    loop.run()
    assert script.lines == ["never read"]  # Ctrl-C at the prompt did not leave; /exit did
    assert len(session.turns) == 2
    for turn, run in zip(session.turns, runs):
        assert turn.assistant == run.result.text != ""  # all that was generated, the unprinted piece too
        assert f"assistant> {turn.assistant}\n" in out.getvalue()  # and the screen shows the same
        assert run.result.finish_reason == "interrupted" and len(run.result.token_ids) < 60
    assert err.getvalue().count("finish: interrupted") == 2
    assert "Ctrl-C again within a second" in err.getvalue()


def test_two_ctrl_c_within_a_second_leave(model):
    script = Script(SIGINT, SIGINT, "never read")
    loop, *_ = make_loop(model, script, ctrl_c=CtrlC(clock=Ticks(0.5)))
    loop.run()
    assert script.lines == ["never read"]


def test_ctrl_c_as_a_reply_ends_neither_leaves_nor_loses_the_turn(model, tmp_path, monkeypatch):
    """SIGINT delivered at the instant a reply ends, while the turn is recorded: it waits, so the turn and its
    autosave complete, and then acts on the prompt (a fresh one) instead of leaving."""
    transcript = tmp_path / "chat.json"
    script = Script("hello", "again", "/exit")
    loop, session, out, err, errors = make_loop(model, script, transcript=transcript, ctrl_c=CtrlC(clock=Ticks(10.0)))
    record = session.add_turn

    def add_turn_under_ctrl_c(user, generation):
        signal.raise_signal(signal.SIGINT)  # Python runs the handler before the next line
        record(user, generation)

    monkeypatch.setattr(session, "add_turn", add_turn_under_ctrl_c)
    loop.run()
    assert [t.user for t in session.turns] == ["hello", "again"] and not errors
    assert script.prompts == ["you> "] * 3 and err.getvalue().count("Ctrl-C again within a second") == 2
    saved = json.loads(transcript.read_text())
    assert [m["content"] for m in saved["messages"][::2]] == ["hello", "again"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the chat's handler is gone


def test_every_reply_is_saved_and_trimming_keeps_every_turn(model, tmp_path):
    transcript = tmp_path / "chats" / "chat.json"
    transcript.parent.mkdir()
    # Messages of about 25 tokens in a 100-token context: the prompt is trimmed after a few turns.
    script = Script(*[f"question number {i} " + "word " * 20 for i in range(6)], "/save " + str(tmp_path / "all.json"))
    loop, session, out, err, errors = make_loop(model, script, transcript=transcript, max_context=100)
    loop.run()
    assert not errors and "took the" in err.getvalue() and session.context_start > 0
    for path in (transcript, tmp_path / "all.json"):
        saved = json.loads(path.read_text())
        users = [m["content"] for m in saved["messages"] if m["role"] == "user"]
        assert users == [f"question number {i} " + "word " * 20 for i in range(6)]
        assert saved["context_start"] == session.context_start and saved["model"] == str(model.path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask()
    assert sorted(p.name for p in transcript.parent.iterdir()) == ["chat.json"]  # no temporary file left

    # /load continues it: the same conversation, and later replies are saved to the loaded file.
    again = tmp_path / "again.json"
    again.write_text(transcript.read_text())
    loop2, session2, *_ = make_loop(model, Script("/load " + str(again), "one more"), max_context=100)
    loop2.run()
    assert [t.user for t in session2.turns][:6] == [t.user for t in session.turns]
    assert json.loads(again.read_text())["messages"][-2]["content"] == "one more"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_control_characters_in_a_reply_are_not_sent_to_the_terminal(model, monkeypatch):
    class CannedRun:
        def __init__(self, pieces):
            self.pieces, self.result = iter(pieces), Generation(finish_reason="stop")

        def __next__(self):
            piece = next(self.pieces)
            self.result.text += piece
            return piece

        def close(self):
            pass

    monkeypatch.setattr(model, "chat_stream", lambda messages, **kw: CannedRun(["clear\x1b[2J", "\tdone\n"]))
    loop, session, out, err, errors = make_loop(model, Script("hi"))
    loop.run()
    assert "assistant> clear\ufffd[2J\tdone\n" in out.getvalue()
    assert session.turns[0].assistant == "clear\x1b[2J\tdone\n"  # the history keeps what the model said


def test_plan_command_shows_the_placement(tmp_path):
    from offload.chat import placement_summary

    folder = random_demo_checkpoint(tmp_path)
    planned = offload.load(folder, device="cpu", gpu_memory="9MiB", max_context=512)
    summary = placement_summary(planned)
    assert "experts pinned" in summary and f"experts as {planned.plan.expert_format}; prefetch " in summary
    choice = planned.prefetch
    assert summary.endswith(f"; prefetch {'on' if choice.on else 'off'}: {choice.reason}")
    on_cpu = offload.load(folder, device="cpu", experts="int8", max_context=512)
    threads = f"; decode threads {on_cpu.decode_threads.describe()}" if on_cpu.decode_threads else ""
    assert placement_summary(on_cpu) == f"all routed experts on the CPU workers as int8{threads}"
    plain = offload.load(folder, device="cpu", max_context=512)
    assert placement_summary(plain) == "all routed experts on cpu with the rest of the model"

    loop, _, out, _, errors = make_loop(planned, Script("/plan", "/exit"))
    assert loop.handle("/plan")
    assert "pinned ids" in out.getvalue() and "kv_cache" in out.getvalue() and not errors


def test_chat_checks_the_transcript_files_before_loading(tmp_path):
    from typer.testing import CliRunner

    from offload.cli import app

    folder = random_demo_checkpoint(tmp_path)
    cases = [(["--resume", str(tmp_path / "missing.json")], "cannot read .*missing.json"),
             (["--transcript", str(tmp_path)], "cannot write the chat transcript to")]
    for args, problem in cases:
        result = CliRunner().invoke(app, ["chat", str(folder), "--device", "cpu", *args])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert re.search(problem, result.output.replace("\n", "")), result.output


def test_ctrl_c_stopping_two_replies_in_quick_succession_does_not_leave(model, monkeypatch):
    real_stream = model.chat_stream

    def stopped_at_once(messages, **kw):
        run = real_stream(messages, **kw)
        signal.raise_signal(signal.SIGINT)  # lands before the first token: waits for the reply's first step
        return run

    monkeypatch.setattr(model, "chat_stream", stopped_at_once)
    script = Script("one", "two", "/exit", "never read")
    loop, session, *_ = make_loop(model, script, ctrl_c=CtrlC(clock=Ticks(0.1)))
    loop.run()
    assert script.lines == ["never read"]
    assert [t.assistant for t in session.turns] == ["", ""]
    assert session.last.finish_reason == "interrupted"
