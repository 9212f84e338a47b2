"""gRPC services of ExpertMesh (router, expert_shard, attention, controller).

Each service folder holds pure logic, a thin servicer and a thin Ray actor.
Installed as ``expertmesh.services``.
"""
