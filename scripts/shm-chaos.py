#!/usr/bin/env python3
"""Chaos run for the shm SIGBUS guard (issue 19, items 1 and 2; docs/reliability.md).

Workers on a 64 MiB tmpfs (mounted here; needs root) with a 128 MiB shm budget get pipelined
bursts of shm and cpu allocates, cpu<->shm copies, defragments, model loads onto shm and
deallocates, while another thread of this script, playing a hostile client, truncates the
worker's shm file at random moments. Every worker must answer until stdin closes and exit 0;
one killed by a signal is a death.

    python3 scripts/shm-chaos.py SECONDS [path/to/memcoord]
"""
import glob, json, os, random, struct, subprocess, sys, tempfile, threading, time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60
binary = sys.argv[2] if len(sys.argv) > 2 else "target/debug/memcoord"
work = tempfile.mkdtemp(prefix="memcoord-chaos-")
shm = os.path.join(work, "shm")
models = os.path.join(work, "models")
os.makedirs(shm)
os.makedirs(models)
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", shm]).returncode != 0:
    sys.exit("SKIPPED: cannot mount a tmpfs (needs root)")

def write_model(path, tensors):
    header, data, off = {}, b"", 0
    for name, n in tensors:
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [off, off + 4 * n]}
        data += os.urandom(4 * n)
        off += 4 * n
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)

write_model(os.path.join(models, "m.safetensors"), [(f"t{i}", (1 << 20) + i * 1000) for i in range(6)])
cfg = os.path.join(work, "memcoord.toml")
with open(cfg, "w") as f:
    f.write(f'shm_dir = "{shm}"\n[budgets]\ncpu = "256MiB"\nshm = "128MiB"\n')

random.seed(7)
deaths = workers = requests = cuts = 0
errors = {}
end = time.time() + seconds
try:
    while time.time() < end:
        workers += 1
        p = subprocess.Popen([binary, "worker", "--no-gpu", "--config", cfg, "--model-root", models],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, bufsize=1)
        stop = False

        def cutter():
            global cuts
            while not stop:
                time.sleep(random.uniform(0.01, 0.2))
                for f in glob.glob(os.path.join(shm, "memcoord-*-shm")):
                    try:
                        with open(f, "r+b") as fh:
                            fh.truncate(random.randrange(0, max(1, os.path.getsize(f))))
                        cuts += 1
                    except OSError:
                        pass

        t = threading.Thread(target=cutter)
        t.start()
        live_cpu, live_shm, i = [], [], 0
        try:
            for _ in range(6):
                sent = 0
                for _ in range(20):
                    i += 1
                    k = random.randrange(10)
                    if k < 3:
                        a, d = "memory.allocate", {"device_id": "shm", "size_bytes": random.randrange(1, 24) << 20, "timeout_seconds": 0}
                    elif k == 3:
                        a, d = "memory.allocate", {"device_id": "cpu", "size_bytes": random.randrange(1, 4) << 20, "timeout_seconds": 0}
                    elif k in (4, 5) and live_cpu:
                        a, d = "memory.transfer", {"allocation_id": random.choice(live_cpu), "source_device_id": "cpu", "destination_device_id": "shm", "mode": "copy", "wait_for_completion": True}
                    elif k == 6 and live_shm:
                        a, d = "memory.transfer", {"allocation_id": random.choice(live_shm), "source_device_id": "shm", "destination_device_id": "cpu", "mode": "copy", "wait_for_completion": True}
                    elif k == 7:
                        a, d = "memory.defragment", {"device_id": "shm"}
                    elif k == 8:
                        a, d = "memory.model_load", {"model_name": f"m{i}", "path": "m.safetensors", "device_id": "shm", "timeout_seconds": 0}
                    elif live_shm:
                        a, d = "memory.deallocate", {"allocation_id": live_shm.pop(random.randrange(len(live_shm)))}
                    else:
                        a, d = "memory.get_usage", {"device_id": "shm"}
                    p.stdin.write(json.dumps({"request_id": str(i), "action": a, "data": d}) + "\n")
                    sent += 1
                p.stdin.flush()
                for _ in range(sent):
                    line = p.stdout.readline()
                    if not line:
                        raise EOFError
                    r = json.loads(line)
                    requests += 1
                    if not r["success"]:
                        errors[r["error_code"]] = errors.get(r["error_code"], 0) + 1
                    data = r.get("data") or {}
                    if data.get("allocation"):
                        (live_shm if data["allocation"]["device_id"] == "shm" else live_cpu).append(data["allocation"]["allocation_id"])
                    if data.get("destination_allocation_id") and data.get("destination_device_id") == "shm":
                        live_shm.append(data["destination_allocation_id"])
        except (EOFError, BrokenPipeError):
            pass
        stop = True
        t.join()
        try:
            p.stdin.close()
        except OSError:
            pass
        rc = p.wait(timeout=60)
        if rc != 0:
            deaths += 1
            print(f"worker {workers}: exit {rc}", flush=True)
finally:
    subprocess.run(["umount", "-l", shm])
print(f"workers {workers}, requests {requests}, truncations {cuts}, deaths {deaths}, errors {errors}")
sys.exit(1 if deaths else 0)
