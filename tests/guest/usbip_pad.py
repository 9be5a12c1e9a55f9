"""An Xbox 360 style pad (any vendor and product id) attached to this machine's own USB stack
through USB/IP's virtual host controller (vhci-hcd), served by this script over a socket pair:
no hardware, no network. Run as root inside the test-bed guest.

  usbip_pad.py attach VID PID   attach it (a child process serves it until it is detached), wait
                                for the kernel to enumerate it, print its state as JSON
  usbip_pad.py state VID PID    print {"interface", "driver", "name"}: the sysfs path of its
                                interface, the driver bound to it, its input device's name
  usbip_pad.py detach           detach it (port 0), wait until the port is free
"""

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

VHCI = Path("/sys/devices/platform/vhci_hcd.0")
PORT = 0
USB_SPEED_FULL = 2
CMD_SUBMIT, CMD_UNLINK, RET_SUBMIT, RET_UNLINK = 1, 2, 3, 4
EPIPE, ECONNRESET = 32, 104


def descriptors(vid: int, pid: int) -> tuple[bytes, bytes]:
    device = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0xFF, 0xFF, 0xFF, 8, vid, pid,
                         0x0114, 0, 0, 0, 1)
    interface = struct.pack("<BBBBBBBBB", 9, 4, 0, 0, 2, 0xFF, 0x5D, 0x01, 0)  # ff/5d/01: wired 360
    ep_in = struct.pack("<BBBBHB", 7, 5, 0x81, 0x03, 32, 4)
    ep_out = struct.pack("<BBBBHB", 7, 5, 0x01, 0x03, 32, 8)
    body = interface + ep_in + ep_out
    config = struct.pack("<BBHBBBBB", 9, 2, 9 + len(body), 1, 1, 0, 0x80, 250) + body
    return device, config


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def reply(sock, seqnum: int, status: int, data: bytes = b"", length: int | None = None) -> None:
    actual = len(data) if length is None else length
    sock.sendall(struct.pack(">IIIII", RET_SUBMIT, seqnum, 0, 0, 0)
                 + struct.pack(">iiiii", status, actual, 0, 0, 0) + bytes(8) + data)


def serve(sock: socket.socket, vid: int, pid: int) -> None:
    """Answer the host controller's URBs: descriptors and requests on endpoint 0, OUT reports
    taken, IN reports held until unlinked (the pad has nothing to say)."""
    device, config = descriptors(vid, pid)
    pending = set()
    while True:
        header = recv_exact(sock, 48)
        command, seqnum, _devid, direction, ep = struct.unpack(">IIIII", header[:20])
        if command == CMD_UNLINK:
            victim = struct.unpack(">I", header[20:24])[0]
            status = -ECONNRESET if victim in pending else 0
            pending.discard(victim)
            sock.sendall(struct.pack(">IIIII", RET_UNLINK, seqnum, 0, 0, 0)
                         + struct.pack(">i", status) + bytes(24))
            continue
        assert command == CMD_SUBMIT, command
        _flags, length, _sf, npackets, _interval = struct.unpack(">IiiiI", header[20:40])
        setup = header[40:48]
        out = recv_exact(sock, length) if direction == 0 and length > 0 else b""
        if npackets > 0:
            recv_exact(sock, 16 * npackets)
        if ep != 0:
            if direction == 0:
                reply(sock, seqnum, 0, length=len(out))
            else:
                pending.add(seqnum)
            continue
        request_type, request, value, _index, w_length = struct.unpack("<BBHHH", setup)
        if request_type == 0x80 and request == 6:          # GET_DESCRIPTOR
            kind = value >> 8
            data = {1: device, 2: config}.get(kind)
            if data is None:
                reply(sock, seqnum, -EPIPE, length=0)
            else:
                reply(sock, seqnum, 0, data[:min(w_length, length)])
        elif request_type & 0x80:
            reply(sock, seqnum, -EPIPE, length=0)
        else:                                              # SET_CONFIGURATION and the like
            reply(sock, seqnum, 0, length=0)


def find(vid: int, pid: int) -> Path | None:
    for dev in Path("/sys/bus/usb/devices").iterdir():
        try:
            ids = ((dev / "idVendor").read_text().strip(), (dev / "idProduct").read_text().strip())
        except OSError:
            continue
        if ids == (f"{vid:04x}", f"{pid:04x}"):
            return dev
    return None


def state(vid: int, pid: int) -> dict:
    dev = find(vid, pid)
    intf = dev.parent / f"{dev.name}:1.0" if dev else None
    if intf is None or not intf.exists():
        return {"interface": None, "driver": None, "name": None}
    driver = intf / "driver"
    names = sorted(intf.glob("input/input*/name"))
    return {"interface": str(intf),
            "driver": os.path.basename(os.readlink(driver)) if driver.exists() else None,
            "name": names[0].read_text().strip() if names else None}


def port_free() -> bool:
    """Port 0's line of the controller's status (hub port sta ...): 004 is VDEV_ST_NULL."""
    for line in (VHCI / "status").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1]) == PORT:
            return fields[2] == "004"
    return False


def attach(vid: int, pid: int) -> dict:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.fork() == 0:                      # the pad: detached from the caller's output
        ours.close()
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        try:
            serve(theirs, vid, pid)
        except (EOFError, OSError):
            pass
        os._exit(0)
    theirs.close()
    (VHCI / "attach").write_text(f"{PORT} {ours.fileno()} {(1 << 16) | 2} {USB_SPEED_FULL}")
    ours.close()                            # the host controller holds its own reference
    deadline = time.monotonic() + 60
    while state(vid, pid)["interface"] is None:
        if time.monotonic() > deadline:
            raise SystemExit("the pad was not enumerated")
        time.sleep(0.1)
    # Its interface is added, and any matching driver probed, by the hub's thread: give a driver
    # time to bind (an interface no driver takes stays unbound).
    deadline = time.monotonic() + 5
    while state(vid, pid)["driver"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return state(vid, pid)


def main() -> None:
    action = sys.argv[1]
    if action == "detach":
        (VHCI / "detach").write_text(str(PORT))
        deadline = time.monotonic() + 30
        while not port_free():  # the controller lets the port go in its own thread
            if time.monotonic() > deadline:
                raise SystemExit("the port stays in use")
            time.sleep(0.1)
        return
    vid, pid = int(sys.argv[2], 16), int(sys.argv[3], 16)
    print(json.dumps(attach(vid, pid) if action == "attach" else state(vid, pid)))


if __name__ == "__main__":
    main()
