"""python -m services.policy"""

import asyncio

from tulle.service import Service, run_service


async def main(svc: Service) -> None:
    # Connects, reports ready and waits; the service's real work comes with its issue.
    await asyncio.Event().wait()


if __name__ == "__main__":
    run_service("policy", main)
