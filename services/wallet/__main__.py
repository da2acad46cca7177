"""python -m services.wallet --db wallet.db --port 50051"""

from services.common import participant_parser, run_participant
from services.wallet.service import ACCESS, WalletApi, WalletHandler
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc

if __name__ == "__main__":
    args = participant_parser(
        "python -m services.wallet", "The wallet service: accounts, deposits, and Debit as a twopc participant."
    ).parse_args()
    run_participant(
        WalletHandler(),
        lambda server, p, readers: wallet_pb2_grpc.add_WalletServicer_to_server(WalletApi(p, readers), server),
        args,
        services=[wallet_pb2.DESCRIPTOR.services_by_name["Wallet"].full_name],
        access=ACCESS,
    )
