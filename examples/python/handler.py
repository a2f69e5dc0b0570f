"""A Switchboard handler in Python, over NATS.

It answers the gateway's connect events and echoes socket messages, the way a Rust handler
added with `Container::add_handler` would. The wire format is in docs/PROTOCOL.md:

- events arrive on the topic's subject (e.g. `socket:connection`) as a JSON envelope
  {"topic", "data", "context"}; subscribe in the queue group `switchboard-handlers` so that
  each event is handled once however many copies of this process run;
- answer on the message's reply subject with {"reply": payload}, {"fail": error}, or {}
  (handled, nothing to say);
- to reach sockets, publish {"username", "namespace", "type", "payload"} to the `send`
  topic, or {"type", "payload", "namespace"?} to the `broadcast` topic.

Run:  python3 handler.py nats://127.0.0.1:4222
It prints "ready" once subscribed, and stops on SIGTERM or Ctrl-C.
"""

import asyncio
import json
import signal
import sys

import nats

GROUP = "switchboard-handlers"
CONNECT_TOPIC = "socket:connection"
MESSAGE_TOPIC = "socket:generalMessage"
SEND_TOPIC = "socket:send"


async def main(url: str) -> None:
    nc = await nats.connect(url, name="python-handler")

    async def on_connect(msg):
        event = json.loads(msg.data)
        ctx = event.get("context", {})
        await msg.respond(json.dumps({
            "reply": {
                "handled_by": "python",
                "username": ctx.get("username"),
                "namespace": ctx.get("namespace"),
            }
        }).encode())

    async def on_message(msg):
        event = json.loads(msg.data)
        data, ctx = event.get("data", {}), event.get("context", {})
        if data.get("type") == "python.poke":
            # reach every socket of the sender in its namespace, through the gateway
            await nc.publish(SEND_TOPIC, json.dumps({
                "username": ctx.get("username"),
                "namespace": ctx.get("namespace"),
                "type": "python.poked",
                "payload": data.get("payload"),
            }).encode())
            await msg.respond(b"{}")
        elif data.get("type") == "python.fail":
            await msg.respond(json.dumps({"fail": {"message": "python says no"}}).encode())
        else:
            await msg.respond(json.dumps({"reply": {"echo": data}}).encode())

    await nc.subscribe(CONNECT_TOPIC, queue=GROUP, cb=on_connect)
    await nc.subscribe(MESSAGE_TOPIC, queue=GROUP, cb=on_message)
    await nc.flush()
    print("ready", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
