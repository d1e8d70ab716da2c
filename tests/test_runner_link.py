"""The agent's side of the shim link (AssignmentRun._serve), with the test playing the shim
over a real socketpair: the orderings a restart can leave in the link, pinned down one by
one (the system tier finds them by killing a real agent at random moments). The scope
manager is a stand-in that only records the stop: no scope exists here."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import uuid
from pathlib import Path

from farmnode.agent.runner import AssignmentRun
from farmnode.config import Config
from farmnode.systemd import link
from farmnode.tasks.model import Assignment, Job, JobTypeRef, Task, TaskState


class Scopes:
    def __init__(self) -> None:
        self.stopped: list[str] = []

    async def stop_scope(self, unit: str) -> bool:
        self.stopped.append(unit)
        return True


def make_run(tmp_path: Path) -> tuple[AssignmentRun, list[tuple[int, TaskState]], Scopes]:
    a = Assignment(str(uuid.uuid4()), Job(id=1, by=1), JobTypeRef("command", 1),
                   (Task(42, 1.0),))
    config = dataclasses.replace(Config(), agent_runtime_dir=str(tmp_path))
    states: list[tuple[int, TaskState]] = []
    scopes = Scopes()
    run = AssignmentRun(a, config, scopes,  # type: ignore[arg-type]
                        lambda _a, t, s, *_: states.append((t, s)),
                        lambda *_: None, lambda *_: None)
    run.started = True
    return run, states, scopes


def packets(sock: socket.socket) -> list[tuple[bytes, int, int, bytes]]:
    out = []
    sock.setblocking(False)
    try:
        while packet := sock.recv(1 << 18):
            out.append(link.unpack(packet))
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return out


def nonce_of(seen: list[tuple[bytes, int, int, bytes]]) -> bytes:
    (nonce,) = {p[2] for p in seen if p[0] == link.RESUME}  # one per agent, both streams
    return int(nonce).to_bytes(8, "big")


def test_stale_exit_before_resumed_is_not_taken(tmp_path: Path) -> None:
    """The shim sent its last stderr line and EXIT to an agent that died unread; the new
    agent must not conclude on that EXIT (it drops the stale DATA before RESUMED) but on the
    one the shim sends after resending."""
    run, states, scopes = make_run(tmp_path)
    agent_end, shim = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    record = json.dumps({"exit_code": 0, "ends": [0, 4]}).encode()
    # what the old agent left unread in the link
    shim.send(link.pack(link.DATA, link.STDERR, 0, b"bye\n"))
    shim.send(link.pack(link.EXIT, payload=record))

    async def play_shim() -> list[tuple[bytes, int, int, bytes]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[bytes, int, int, bytes]] = []
        while sum(1 for p in seen if p[0] == link.RESUME) < 2:
            await asyncio.sleep(0.01)
            seen += packets(shim)
        nonce = nonce_of(seen)
        shim.send(link.pack(link.RESUMED, link.STDOUT, 0, nonce))
        shim.send(link.pack(link.RESUMED, link.STDERR, 0, nonce))
        shim.send(link.pack(link.DATA, link.STDERR, 0, b"bye\n"))
        shim.send(link.pack(link.EXIT, payload=record))
        while not any(p[0] == link.EXIT_ACK for p in seen):
            await asyncio.sleep(0.01)
            seen += packets(shim)
        await loop.run_in_executor(None, shim.close)
        return seen

    async def scenario() -> list[tuple[bytes, int, int, bytes]]:
        shim_task = asyncio.create_task(play_shim())
        await run._serve(agent_end, resume=True)
        return await shim_task

    seen = asyncio.run(scenario())
    kinds = [p[0] for p in seen]
    writes = [(p[1], p[2], p[3]) for p in seen if p[0] == link.WRITE]
    assert writes == [(link.STDERR, 4, b"<4>bye\n")]
    assert kinds.index(link.WRITE) < kinds.index(link.EXIT_ACK)
    assert states == [(42, TaskState.DONE)]
    assert scopes.stopped == ["farmnode-task-42.scope"]


def test_resumed_offset_is_where_writes_continue(tmp_path: Path) -> None:
    """A new agent learns from the RESUMED with its own nonce how far the shim journaled
    (not from one meant for an agent that died while resuming), and its WRITEs cover the
    resent bytes from there on."""
    run, states, _ = make_run(tmp_path)
    agent_end, shim = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    async def play_shim() -> list[tuple[bytes, int, int, bytes]]:
        seen: list[tuple[bytes, int, int, bytes]] = []
        while sum(1 for p in seen if p[0] == link.RESUME) < 2:
            await asyncio.sleep(0.01)
            seen += packets(shim)
        nonce = nonce_of(seen)
        # the answers to an agent that died while resuming, and what followed them, first
        shim.send(link.pack(link.RESUMED, link.STDOUT, 4, b"\0" * 8))
        shim.send(link.pack(link.DATA, link.STDOUT, 4, b"two\nthree\nfo"))
        shim.send(link.pack(link.RESUMED, link.STDOUT, 8, nonce))  # "one\ntwo\n" journaled
        shim.send(link.pack(link.RESUMED, link.STDERR, 0, nonce))
        shim.send(link.pack(link.DATA, link.STDOUT, 8, b"three\nfo"))
        shim.send(link.pack(link.EXIT, payload=json.dumps({"exit_code": 0}).encode()))
        while not any(p[0] == link.EXIT_ACK for p in seen):
            await asyncio.sleep(0.01)
            seen += packets(shim)
        shim.close()
        return seen

    async def scenario() -> list[tuple[bytes, int, int, bytes]]:
        shim_task = asyncio.create_task(play_shim())
        await run._serve(agent_end, resume=True)
        return await shim_task

    seen = asyncio.run(scenario())
    writes = [(p[1], p[2], p[3]) for p in seen if p[0] == link.WRITE]
    # offsets count from the resume point; the unterminated tail is journaled at the exit
    assert writes == [(link.STDOUT, 14, b"<6>three\n"), (link.STDOUT, 16, b"<6>fo\n")]
    assert states == [(42, TaskState.DONE)]
