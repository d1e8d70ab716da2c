"""Pre and post hooks of an assignment, run inside its scope as the job's user.

When an assignment has hooks, the shim's child does not exec the job itself: having dropped
privileges it becomes this small supervisor, which runs the pre-hook, then the job, then the
post-hook, one after the other, all on the job's stdout and stderr (so journald files their
lines under the task, as the job's). It ignores the stop signals meant for the job, like the
shim, and leaves with the job's own wait status (re-raising its signal), so the shim records
what it would have without hooks. A hook's failure goes back to the shim on the report
descriptor as one line of text, its output's tail included: the task's reason.

Standard library only: it runs in every task with hooks, before the job.
"""

from __future__ import annotations

import os
import select
import signal

TAIL = 2048  # bytes of a failing hook's output that go into the reason
_CHUNK = 65536


def _spawn(argv: list[str], env: dict[str, str], out_fd: int, err_fd: int,
           shielded: tuple[int, ...]) -> tuple[int, str]:
    """fork and exec `argv` with stdout/stderr on the given fds; (pid, exec error)."""
    exec_r, exec_w = os.pipe()  # close-on-exec: EOF without data means exec succeeded
    pid = os.fork()
    if pid == 0:
        try:
            os.close(exec_r)
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            for sig in shielded:
                signal.signal(sig, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            os.write(exec_w, f"exec {argv[0]}: {msg}".encode())
        os._exit(127)
    os.close(exec_w)
    chunks = []
    while chunk := os.read(exec_r, _CHUNK):
        chunks.append(chunk)
    os.close(exec_r)
    return pid, b"".join(chunks).decode(errors="replace")


def describe(wstatus: int) -> str:
    if os.WIFSIGNALED(wstatus):
        return f"killed by signal {os.WTERMSIG(wstatus)}"
    return f"exit {os.WEXITSTATUS(wstatus)}"


def run_hook(argv: list[str], env: dict[str, str], shielded: tuple[int, ...]) -> tuple[int, str]:
    """Run a hook to its end, its output copied to our stdout/stderr as it comes and its
    tail kept; (wait status, tail or exec error)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid, exec_error = _spawn(argv, env, out_w, err_w, shielded)
    os.close(out_w)
    os.close(err_w)
    tail = bytearray()
    copy_to = {out_r: 1, err_r: 2}
    while copy_to:
        ready, _, _ = select.select(list(copy_to), [], [])
        for fd in ready:
            data = os.read(fd, _CHUNK)
            if not data:
                os.close(fd)
                del copy_to[fd]
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(copy_to[fd], view):]
            tail += data
            del tail[:-TAIL]
    _, wstatus = os.waitpid(pid, 0)
    text = exec_error or tail.decode(errors="replace").strip()
    return wstatus, text


def _report(fd: int, text: str) -> None:
    data = text.encode(errors="replace")[:4 * TAIL]
    while data:
        data = data[os.write(fd, data):]


def _leave(wstatus: int) -> int:
    """Exit as the job did: its code, or its signal (the shim records it as the job's)."""
    if os.WIFSIGNALED(wstatus):
        sig = os.WTERMSIG(wstatus)
        if sig != signal.SIGKILL:  # the one whose handling cannot be set (or ignored)
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig  # a signal that does not end a process by default
    return os.WEXITSTATUS(wstatus)


def supervise(pre: list[str] | None, argv: list[str], post: list[str] | None,
              env: dict[str, str], report_fd: int, shielded: tuple[int, ...]) -> int:
    """pre-hook, job, post-hook; the exit code to leave with (or the job's signal, raised).

    A failing pre-hook stops here: the job never runs. A failing post-hook fails a job that
    succeeded (its outputs may not be where the hook should have put them); after a job
    that failed, the job's own failure is the reason and the hook's output is only logged.
    """
    if pre:
        wstatus, text = run_hook(pre, {**env, "FARMNODE_HOOK": "pre"}, shielded)
        if wstatus != 0:
            _report(report_fd, f"pre-hook {pre[0]} failed ({describe(wstatus)}): {text}")
            return _leave(wstatus)
    pid, exec_error = _spawn(argv, env, 1, 2, shielded)
    if exec_error:
        os.waitpid(pid, 0)
        _report(report_fd, exec_error)
        return 127
    _, job_status = os.waitpid(pid, 0)
    if post:
        post_env = {**env, "FARMNODE_HOOK": "post"}
        if os.WIFSIGNALED(job_status):
            post_env["FARMNODE_EXIT_SIGNAL"] = str(os.WTERMSIG(job_status))
        else:
            post_env["FARMNODE_EXIT_CODE"] = str(os.WEXITSTATUS(job_status))
        wstatus, text = run_hook(post, post_env, shielded)
        if wstatus != 0 and job_status == 0:
            _report(report_fd, f"post-hook {post[0]} failed ({describe(wstatus)}): {text}")
            return _leave(wstatus)
    return _leave(job_status)
