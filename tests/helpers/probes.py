"""Continuous probes for restart tests, run with `python -c SCRIPT ARGS` inside a pod.

RECEIVER logs every UDP datagram (port, source, payload, arrival time on the system-wide monotonic
clock) to a file; SENDER sends to each port about 500 times a second until a stop file exists and
then prints what it sent; HTTP_PROBER does one GET after another and logs each status ("000" when no
answer came) with its time, until the stop file exists. Checking every packet and every request,
not samples, is what makes "nothing passed at any moment" a claim a test can make.
"""

RECEIVER = """
import select, socket, sys, time
log = open(sys.argv[1], "w", buffering=1)
socks = []
for port in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(port))); socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(256)
        log.write(f"{s.getsockname()[1]} {peer[0]} {data.decode()} {time.monotonic()}\\n")
"""

SENDER = """
import os, socket, sys, time
dst, stop, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = {p: 0 for p in ports}
print("sending", flush=True)
seq = 0
while not os.path.exists(stop):
    for p in ports:
        try:
            s.sendto(str(seq).encode(), (dst, p)); sent[p] += 1
        except OSError:
            pass
    seq += 1
    time.sleep(0.002)
print(" ".join(f"{p}={n}" for p, n in sent.items()), flush=True)
"""

HTTP_PROBER = """
import os, sys, time, urllib.request
url, log, stop = sys.argv[1], open(sys.argv[2], "w", buffering=1), sys.argv[3]
print("probing", flush=True)
while not os.path.exists(stop):
    t = time.monotonic()
    try:
        code = str(urllib.request.urlopen(url, timeout=0.5).status)
    except urllib.error.HTTPError as e:
        code = str(e.code)
    except Exception:
        code = "000"
    log.write(f"{code} {t}\\n")
    time.sleep(0.02)
"""
