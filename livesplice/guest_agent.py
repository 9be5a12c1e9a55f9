"""The agent that runs as PID 1 inside a test-bed guest and executes the host's commands.

It speaks JSON lines over a virtio-serial port: the host sends {"id", "argv", "timeout", "cwd",
"env"}, the agent answers {"id", "status", "stdout", "stderr", "timed_out"} with output in base64.
Only the standard library is used: the guest runs this file with the host's interpreter, over 9p.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import time

PORT_NAME = "livesplice.agent"


def find_port() -> str:
    for _ in range(200):
        base = "/sys/class/virtio-ports"
        if os.path.isdir(base):
            for port in os.listdir(base):
                try:
                    with open(f"{base}/{port}/name") as f:
                        if f.read().strip() == PORT_NAME:
                            return f"/dev/{port}"
                except OSError:
                    pass
        time.sleep(0.05)
    raise SystemExit("livesplice agent: no virtio port named " + PORT_NAME)


def run(request: dict) -> dict:
    env = dict(os.environ)
    env.update(request.get("env") or {})
    timed_out = False
    proc = subprocess.Popen(request["argv"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=request.get("cwd") or "/", env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=request.get("timeout"))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return {"id": request["id"], "status": proc.returncode, "timed_out": timed_out,
            "stdout": base64.b64encode(out).decode(), "stderr": base64.b64encode(err).decode()}


def main() -> None:
    port = os.open(find_port(), os.O_RDWR)
    reader = os.fdopen(port, "rb", buffering=0)
    buf = b""
    os.write(port, (json.dumps({"ready": True}) + "\n").encode())
    while True:
        chunk = reader.read(65536)
        if not chunk:  # host closed its end: wait for it to come back
            time.sleep(0.05)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            request = json.loads(line)
            if request.get("poweroff"):
                os.sync()
                # Ends the guest: as PID 1, exiting makes the kernel panic, so ask for power-off.
                with open("/proc/sysrq-trigger", "w") as f:
                    f.write("o")
                time.sleep(10)
            try:
                reply = run(request)
            except Exception as exc:  # report it: the host must never wait on a silent agent
                reply = {"id": request.get("id"), "status": 127, "timed_out": False,
                         "stdout": "", "stderr": base64.b64encode(str(exc).encode()).decode()}
            data = (json.dumps(reply) + "\n").encode()
            while data:
                data = data[os.write(port, data):]


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:  # PID 1 must not die silently: the console shows why
        print(f"livesplice agent died: {exc!r}", file=sys.stderr, flush=True)
        raise
