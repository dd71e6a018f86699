"""PostgreSQL store: how soon does a running `honed serve` (default poll 2 s, NOTIFY) serve a promotion?"""
import time, httpx, honed
store = honed.open_store("postgresql+psycopg://postgres@127.0.0.1:5432/qa_c")
H = {"Authorization": "Bearer sk-test"}
def ask(): return httpx.post("http://127.0.0.1:18433/v1/chat/completions", json={"model": "noise", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, headers=H).json()["model"]
for target in ("noise@v2", "noise@v1"):
    print("before:", ask())
    t = time.monotonic(); store.promote(target, reason="qa") if target == "noise@v2" else store.rollback("noise", reason="qa")
    while ask() != target: time.sleep(0.02)
    print(f"{target} served after {time.monotonic() - t:.2f} s")
