import anyio

import mailstrom_async


async def test_anyio_runs() -> None:
    await anyio.sleep(0)
    assert mailstrom_async.RecipientState.QUEUED.value == "queued"
