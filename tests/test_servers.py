"""The server fixtures start real Redis processes that behave like production ones."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from servers import RedisCluster, RedisServer

# Returns both keys' values; EVAL needs its keys in one slot on a cluster.
GET_BOTH = "return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}"


def test_single_server_sets_and_gets(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert client.set("tenant:acme", "42")
        assert client.get("tenant:acme") == "42"
        assert client.dbsize() == 1


def test_redis_url_starts_empty(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_cluster_spreads_keys_over_all_three_nodes(
    redis_cluster: RedisCluster, redis_cluster_url: str
) -> None:
    with ClusterClient.from_url(redis_cluster_url, decode_responses=True) as client:
        for i in range(100):
            client.set(f"key:{i}", str(i))
        assert [client.get(f"key:{i}") for i in range(100)] == [str(i) for i in range(100)]

    sizes = []
    for node in redis_cluster.nodes:
        with node.client() as node_client:
            sizes.append(node_client.dbsize())
    assert len(sizes) == 3
    assert all(size > 0 for size in sizes), sizes
    assert sum(sizes) == 100


def test_cluster_eval_needs_keys_in_one_slot(
    redis_cluster: RedisCluster, redis_cluster_url: str
) -> None:
    with ClusterClient.from_url(redis_cluster_url, decode_responses=True) as client:
        client.set("{tenant:acme}:minute", "1")
        client.set("{tenant:acme}:day", "2")
        assert client.eval(GET_BOTH, 2, "{tenant:acme}:minute", "{tenant:acme}:day") == ["1", "2"]

        assert client.keyslot("tenant:a") != client.keyslot("tenant:b")
        # redis-py refuses before sending anything...
        with pytest.raises(RedisClusterException, match="same key slot"):
            client.eval(GET_BOTH, 2, "tenant:a", "tenant:b")

    # ...and the server itself answers CROSSSLOT (redis-py raises ClusterCrossSlotError,
    # a ResponseError, and drops the code from the message) whichever node gets it.
    for node in redis_cluster.nodes:
        with node.client() as node_client, pytest.raises(ClusterCrossSlotError):
            node_client.eval(GET_BOTH, 2, "tenant:a", "tenant:b")


def test_server_restarts_on_the_same_port_after_a_kill() -> None:
    with RedisServer() as server:
        port = server.port
        with redis.Redis.from_url(server.url, socket_timeout=1.0) as client:
            client.set("counter", 5)

            server.kill()
            assert not server.running
            with pytest.raises(redis.ConnectionError):
                client.get("counter")

            server.start()
            assert server.port == port
            assert server.running
            # Same client, same URL: it reconnects; nothing was persisted.
            assert client.get("counter") is None
        server.stop()
        assert not server.running
    assert not server.directory.exists()
