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

# LOAD_CLIENT: three loops at once until the stop file exists, each line "KIND CODE TIME" in the log:
#   new    a new connection per request (Connection: close) to the allowed URL
#   keep   one keep-alive connection reused for request after request to the allowed URL
#   denied a new connection per request to the denied URL (the answer must stay 403)
# A reused keep-alive connection that the server closed before answering (a draining proxy closes its
# idle connections) is retried once on a new connection, as curl, Go's net/http and urllib3 do for
# idempotent requests; the line says "retry" then. Only the fresh connection's failure is a failure.
# argv: HOST ALLOWED_PATH DENIED_PATH LOG STOP
LOAD_CLIENT = """
import http.client, os, sys, threading, time
host, allowed, denied, stop = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
log = open(sys.argv[4], "w", buffering=1)
lock = threading.Lock()
def write(kind, code):
    with lock:
        log.write(f"{kind} {code} {time.monotonic()}\\n")
def once(path, conn=None, keep=False):
    conn = conn or http.client.HTTPConnection(host, 80, timeout=3)
    conn.request("GET", path, headers={} if keep else {"Connection": "close"})
    r = conn.getresponse(); r.read()
    return str(r.status), conn
def fresh_loop(kind, path):
    while not os.path.exists(stop):
        conn = None
        try:
            code, conn = once(path)
        except Exception as e:
            code = "000:" + type(e).__name__
        if conn is not None:
            conn.close()
        write(kind, code)
        time.sleep(0.005)
def keep_loop():
    conn = None
    while not os.path.exists(stop):
        code = "000"
        try:
            if conn is not None:
                try:
                    code, conn = once(allowed, conn, keep=True)
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    conn.close(); conn = None
                    write("keep", "retry")
            if conn is None:
                code, conn = once(allowed, keep=True)
        except Exception as e:
            if conn is not None:
                conn.close()
            conn = None
            code = "000:" + type(e).__name__
        write("keep", code)
        time.sleep(0.005)
threads = [threading.Thread(target=fresh_loop, args=("new", allowed)), threading.Thread(target=fresh_loop, args=("denied", denied)),
           threading.Thread(target=keep_loop)]
for t in threads:
    t.start()
print("probing", flush=True)
for t in threads:
    t.join()
"""
