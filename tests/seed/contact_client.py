"""A client written the seed's way (Python grpcio, code generated from
proto/contact.proto), run against contactd by tests/serve.rs.

Usage: contact_client.py HOST:PORT PROTO_DIR OUT_DIR
Prints one JSON object with what each RPC returned.
"""
import json
import sys

import grpc
from grpc_tools import protoc


def main():
    target, proto_dir, out_dir = sys.argv[1:4]
    # Generate the stubs exactly as the seed does (python -m grpc_tools.protoc ...).
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", f"{proto_dir}/contact.proto"])
    if rc != 0:
        raise SystemExit(f"protoc failed: {rc}")
    sys.path.insert(0, out_dir)
    import contact_pb2
    import contact_pb2_grpc

    report = {}
    with grpc.insecure_channel(target) as channel:
        stub = contact_pb2_grpc.ContactStub(channel)

        # sendStatus: the seed's make_some_data(), ten messages.
        statuses = (contact_pb2.ClientMsg(msg=f"data:{i}") for i in range(10))
        report["status_replies"] = [r.ret for r in stub.sendStatus(statuses, timeout=20)]

        # getTask then tellResult, as the seed's get_task() generator does.
        tasks = stub.getTask(contact_pb2.Empty(), timeout=20)
        received = []
        for task in tasks:
            received.append(task.task)
            if len(received) == 3:
                break
        tasks.cancel()
        report["tasks"] = received
        acks = (contact_pb2.Result(ret=f"client received task:{t}") for t in received)
        stub.tellResult(acks, timeout=20)
        report["tell_result"] = "ok"

        # remoteCMD fired as futures, then collected, as the seed's send_cmd().
        futures = [stub.remoteCMD.future(contact_pb2.cmdRequest(
            index=i, cmdStr=f"echo veth{i}", log=f"PTP n1 - n{i}"), timeout=20) for i in range(10)]
        report["commands"] = [[f.result().index, f.result().success, f.result().res] for f in futures]

        # A command that is not allow-listed fails with PERMISSION_DENIED.
        try:
            stub.remoteCMD(contact_pb2.cmdRequest(index=99, cmdStr="ip link add veth0"), timeout=20)
            report["denied"] = "not denied"
        except grpc.RpcError as e:
            report["denied"] = e.code().name

    print(json.dumps(report))


if __name__ == "__main__":
    main()
