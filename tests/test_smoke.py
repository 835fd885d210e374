from orders import Item, OrderStatus


async def test_create_then_get(client):
    order = await client.create([Item("Laptop", 1, 1000.0), Item("Mouse", 2, 25.0)])
    assert order.total_amount == 1050.0
    assert (await client.get(order.id)) == order
    confirmed = await client.update_status(order.id, OrderStatus.CONFIRMED)
    assert confirmed.version == 2
