"""The hypothesis state machine from orders.testing, run against a real server over a real socket."""

from hypothesis import settings

from orders.testing import OrderStateMachine

TestOrderService = OrderStateMachine.TestCase
TestOrderService.settings = settings(TestOrderService.settings, max_examples=50, stateful_step_count=30)
