"""Kill a server's process group once the process that started it is gone.

Started by ``servers.ManagedServer.start`` as ``python -m inference_course._reaper PARENT_PID PGID`` in
its own session, so that it survives its parent. It waits for the parent to exit (by any means,
SIGKILL included), then terminates the group: SIGTERM, a grace period, SIGKILL. It also exits quietly
once the group is gone (the server was stopped normally). Standard library only.
"""
import os
import select
import signal
import sys
import time


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, read from /proc (Linux)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _group_alive(pgid: int) -> bool:
    """True while the group has a live member; an unreaped zombie leader is not alive."""
    return bool(group_members(pgid))


def _wait_parent(parent: int, pgid: int) -> bool:
    """Return True when the parent died, False when the server group vanished first."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        fd = None
    while _group_alive(pgid):
        if fd is not None:
            if select.select([fd], [], [], 0.5)[0]:
                return True
        else:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.5)
    return False


def main(parent: int, pgid: int, grace: float = 10.0, cleanup: list[str] | None = None) -> None:
    """``cleanup``: a command run once the group is gone, for what lives outside it (a container that
    conmon keeps running after the ``podman run`` client in the group died)."""
    if not _wait_parent(parent, pgid):
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if cleanup:
        import subprocess

        subprocess.run(cleanup, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120, check=False)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), cleanup=sys.argv[3:] or None)
