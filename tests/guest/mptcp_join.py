"""An MPTCP connection between two network namespaces of the guest whose server answers with
syncookies only (net.ipv4.tcp_syncookies=2) and announces a backup endpoint (10.0.0.2, id 5):
the client joins it (MP_JOIN), and the script prints, as JSON, the flags and local id the
server's subflow to that endpoint got (`ss`: `b` is the backup flag the server asks for).

A join through a syncookie keeps no request socket between its SYN and its third ACK: the
kernel rebuilds one from join_entries[] at the ACK. To show what the rebuilt one lacks, the
client's third ACK to 10.0.0.2 is held back 2.5 s (netem), and meanwhile a second join (from a
new client endpoint to 10.0.0.1, local id 0, no backup) passes through, as on a busy server: a
field the kernel does not restore is then the other join's. All the server's packets are taken
on CPU 0 (RPS), whose free request sockets are reused last in, first out.

  mptcp_join.py SERVER_NS CLIENT_NS    (run as root in the guest; makes and deletes both)
"""

import json
import re
import socket
import subprocess
import sys
import time

IPPROTO_MPTCP = 262
PORT = 4000


def sh(cmd: str) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{cmd}: {r.stdout}{r.stderr}")
    return r.stdout


def join_syns(ns: str) -> int:
    lines = [line.split() for line in sh(f"ip netns exec {ns} cat /proc/net/netstat").splitlines()
             if line.startswith("MPTcpExt:")]
    return int(dict(zip(lines[0], lines[1]))["MPJoinSynRx"])


def server() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    s.bind(("0.0.0.0", PORT))
    s.listen(8)
    print("listening", flush=True)
    conn, _ = s.accept()  # kept open: the connection lives as long as this process
    time.sleep(120)
    conn.close()


def client() -> None:
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    c.connect(("10.0.0.1", PORT))
    c.send(b"x")
    time.sleep(120)


def main() -> None:
    if sys.argv[1] in ("server", "client"):
        {"server": server, "client": client}[sys.argv[1]]()
        return
    srv, cli = sys.argv[1], sys.argv[2]
    sh("modprobe -a veth sch_prio sch_netem cls_u32")
    setup = f"""ip netns add {srv}
        ip netns add {cli}
        ip -n {srv} link add vs type veth peer name vc netns {cli}
        ip -n {srv} addr add 10.0.0.1/24 dev vs
        ip -n {srv} addr add 10.0.0.2/24 dev vs
        ip -n {cli} addr add 10.0.0.10/24 dev vc
        ip -n {cli} addr add 10.0.0.11/24 dev vc
        ip -n {srv} link set vs up
        ip -n {cli} link set vc up
        ip netns exec {srv} sh -c 'echo 1 > /sys/class/net/vs/queues/rx-0/rps_cpus'
        ip netns exec {srv} sysctl -qw net.ipv4.tcp_syncookies=2
        ip -n {srv} mptcp limits set subflows 4 add_addr_accepted 0
        ip -n {srv} mptcp endpoint add 10.0.0.2 id 5 signal backup
        ip -n {cli} mptcp limits set subflows 4 add_addr_accepted 2
        tc -n {cli} qdisc add dev vc root handle 1: prio
        tc -n {cli} qdisc add dev vc parent 1:3 handle 30: netem delay 2500ms
        tc -n {cli} filter add dev vc parent 1: protocol ip prio 1 u32 match ip dst 10.0.0.2/32 match u8 0 2 at 33 flowid 1:3"""
    try:
        for line in setup.splitlines():
            sh(line.strip())
        srv_proc = subprocess.Popen(["ip", "netns", "exec", srv, sys.executable, __file__, "server"],
                                    stdout=subprocess.PIPE, text=True)
        assert srv_proc.stdout is not None
        srv_proc.stdout.readline()
        cli_proc = subprocess.Popen(["ip", "netns", "exec", cli, sys.executable, __file__, "client"])
        try:
            deadline = time.monotonic() + 30
            while join_syns(srv) < 1:  # the join to 10.0.0.2 has sent its SYN
                if time.monotonic() > deadline:
                    sys.exit("no MP_JOIN SYN reached the server")
                time.sleep(0.01)
            sh(f"ip -n {cli} mptcp endpoint add 10.0.0.11 dev vc subflow")  # the other join
            time.sleep(5)  # both third ACKs are in
            out = sh(f"ip netns exec {srv} ss -tniH state established")
        finally:
            cli_proc.kill()
            srv_proc.kill()
            cli_proc.wait()
            srv_proc.wait()
    finally:
        subprocess.run(f"ip netns del {srv}; ip netns del {cli}", shell=True, capture_output=True)
    m = re.search(rf"10\.0\.0\.2:{PORT} .*\n.*tcp-ulp-mptcp flags:(\w+) "
                  r"token:\w+\(id:\d+\)/\w+\(id:(\d+)\)", out)
    print(json.dumps({"flags": m.group(1), "local_id": int(m.group(2))} if m else {"ss": out}))


if __name__ == "__main__":
    main()
