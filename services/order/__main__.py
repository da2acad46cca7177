"""python -m services.order --db orders.db --port 50052"""

from services.common import participant_parser, run_participant
from services.order.service import ACCESS, OrderHandler, OrdersApi
from services.order.v1 import order_pb2, order_pb2_grpc

if __name__ == "__main__":
    args = participant_parser(
        "python -m services.order", "The order service: stock, orders, and PlaceOrder as a twopc participant."
    ).parse_args()
    run_participant(
        OrderHandler(),
        lambda server, p, readers: order_pb2_grpc.add_OrdersServicer_to_server(OrdersApi(p, readers), server),
        args,
        services=[order_pb2.DESCRIPTOR.services_by_name["Orders"].full_name],
        access=ACCESS,
    )
