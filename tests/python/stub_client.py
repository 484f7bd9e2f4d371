"""A Python client generated from proto/ by grpcio-tools calls a running coordinator.

Makes Deposit, Withdraw, PlaceBuy, PlaceSell and Transfer (and a refusal of each kind a caller
must handle) and checks every reply. Exits non-zero with a message at the first mismatch.

    python -m grpc_tools.protoc -I proto --python_out=OUT --grpc_python_out=OUT \
        proto/lockstep/coordinator/v1/coordinator.proto
    PYTHONPATH=OUT python tests/python/stub_client.py 127.0.0.1:50051

With LOCKSTEP_TLS_CA (a CA certificate file) it connects over TLS, checking the server's
certificate for "localhost"; with LOCKSTEP_TOKEN it sends `authorization: Bearer <token>` on
every call (only over TLS: gRPC never sends call credentials in clear).
"""

import os
import sys

import grpc

from lockstep.coordinator.v1 import coordinator_pb2 as pb
from lockstep.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

TIMEOUT_SECONDS = 10
USER = "python-stub"


def expect(what, actual, wanted):
    if actual != wanted:
        sys.exit(f"{what}: expected {wanted!r}, got {actual!r}")


def expect_code(what, call, wanted):
    try:
        call()
    except grpc.RpcError as error:
        expect(what, error.code(), wanted)
        return error
    sys.exit(f"{what}: expected {wanted}, got a reply")


def open_channel(address):
    ca = os.environ.get("LOCKSTEP_TLS_CA")
    if not ca:
        return grpc.insecure_channel(address)
    with open(ca, "rb") as file:
        credentials = grpc.ssl_channel_credentials(root_certificates=file.read())
    token = os.environ.get("LOCKSTEP_TOKEN")
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, credentials, options=(("grpc.ssl_target_name_override", "localhost"),))


def main(address):
    with open_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_SECONDS)
        coordinator = pb_grpc.CoordinatorStub(channel)

        deposit = pb.DepositRequest(user_id=USER, amount="500.00", request_id="python-deposit-1")
        reply = coordinator.Deposit(deposit, timeout=TIMEOUT_SECONDS)
        expect("Deposit cash_balance", reply.cash_balance, "500.00")
        expect("Deposit amount", reply.amount, "500.00")
        retried = coordinator.Deposit(deposit, timeout=TIMEOUT_SECONDS)
        expect("Deposit retried with the same request_id", retried, reply)

        reply = coordinator.Withdraw(pb.WithdrawRequest(user_id=USER, amount="120.25"), timeout=TIMEOUT_SECONDS)
        expect("Withdraw cash_balance", reply.cash_balance, "379.75")

        buy = coordinator.PlaceBuy(
            pb.PlaceOrderRequest(user_id=USER, asset="SOL", quantity="2"), timeout=TIMEOUT_SECONDS
        )
        expect("PlaceBuy status", buy.order.status, pb.ORDER_STATUS_CONFIRMED)
        expect("PlaceBuy side", buy.order.side, pb.ORDER_SIDE_BUY)
        expect("PlaceBuy total", buy.order.total, "290.50")
        expect("PlaceBuy has no limit_price", buy.order.HasField("limit_price"), False)
        expect("PlaceBuy cash_balance", buy.cash_balance, "89.25")
        expect("PlaceBuy holding", buy.holding, "2")

        sell = coordinator.PlaceSell(
            pb.PlaceOrderRequest(user_id=USER, asset="SOL", quantity="0.5", limit_price="140"),
            timeout=TIMEOUT_SECONDS,
        )
        expect("PlaceSell side", sell.order.side, pb.ORDER_SIDE_SELL)
        expect("PlaceSell limit_price", sell.order.limit_price, "140")
        expect("PlaceSell total", sell.order.total, "72.62")
        expect("PlaceSell cash_balance", sell.cash_balance, "161.87")
        expect("PlaceSell holding", sell.holding, "1.5")

        expect_code(
            "Withdraw beyond the balance",
            lambda: coordinator.Withdraw(pb.WithdrawRequest(user_id=USER, amount="1000.00"), timeout=TIMEOUT_SECONDS),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        error = expect_code(
            "Deposit with 3 decimals",
            lambda: coordinator.Deposit(pb.DepositRequest(user_id=USER, amount="1.005"), timeout=TIMEOUT_SECONDS),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        expect("INVALID_ARGUMENT message", error.details(), "amount: must have at most 2 decimal places")

        account = coordinator.GetAccount(pb.GetAccountRequest(user_id=USER), timeout=TIMEOUT_SECONDS)
        expect("GetAccount cash_balance", account.cash_balance, "161.87")
        expect("GetAccount holdings", [(h.asset, h.quantity) for h in account.holdings], [("SOL", "1.5")])

        receiver = USER + "-receiver"
        coordinator.Deposit(pb.DepositRequest(user_id=receiver, amount="1.00"), timeout=TIMEOUT_SECONDS)
        transfer = pb.TransferRequest(
            from_user_id=USER,
            to_user_id=receiver,
            amount="61.87",
            memo="from Python",
            request_id="python-transfer-1",
        )
        reply = coordinator.Transfer(transfer, timeout=TIMEOUT_SECONDS)
        expect("Transfer from_user_id", reply.from_user_id, USER)
        expect("Transfer to_user_id", reply.to_user_id, receiver)
        expect("Transfer amount", reply.amount, "61.87")
        expect("Transfer memo", reply.memo, "from Python")
        expect("Transfer cash_balance (the sender's)", reply.cash_balance, "100.00")
        expect("Transfer transfer_id is a UUID", len(reply.transfer_id), 36)
        retried = coordinator.Transfer(transfer, timeout=TIMEOUT_SECONDS)
        expect("Transfer retried with the same request_id", retried, reply)
        error = expect_code(
            "Transfer to an account that does not exist",
            lambda: coordinator.Transfer(
                pb.TransferRequest(from_user_id=USER, to_user_id=USER + "-typo", amount="1.00"),
                timeout=TIMEOUT_SECONDS,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        expect("NOT_FOUND message", error.details(), f"Account {USER}-typo not found")
        error = expect_code(
            "Transfer to oneself",
            lambda: coordinator.Transfer(
                pb.TransferRequest(from_user_id=USER, to_user_id=USER, amount="1.00"), timeout=TIMEOUT_SECONDS
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        expect("Transfer to oneself names to_user_id", error.details().split(":")[0], "to_user_id")

        received = coordinator.ListLedger(pb.ListLedgerRequest(user_id=receiver, page_size=10), timeout=TIMEOUT_SECONDS)
        newest = received.entries[0]
        expect("receiver's entry kind", newest.kind, pb.ENTRY_KIND_TRANSFER_IN)
        expect("receiver's entry transfer_id", newest.transfer_id, reply.transfer_id)
        expect("receiver's entry counterparty", newest.counterparty_user_id, USER)
        expect("receiver's entry memo", newest.memo, "from Python")
        expect("receiver's entry cash_balance", newest.cash_balance, "62.87")
        account = coordinator.GetAccount(pb.GetAccountRequest(user_id=USER), timeout=TIMEOUT_SECONDS)
        expect("GetAccount cash_balance after the transfer", account.cash_balance, "100.00")
        expect("GetAccount transferred_today", account.transferred_today, "61.87")
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: stub_client.py HOST:PORT")
    main(sys.argv[1])
