/* Membrane sockmap accelerator: proxy <-> local endpoint sockets exchange bytes socket to socket.
 *
 * Theory of operation
 * -------------------
 * mbr_sockops (sock_ops, cgroup-v2 root): when a TCP socket becomes established and its local or
 * remote port is in mbr_sm_ports, it goes into mbr_sockhash under
 *     {local addr, remote addr, local port, remote port, netns cookie}
 * with IPv4 addresses written v4-mapped, so AF_INET and dual-stack AF_INET6 sockets key alike.
 * A socket outside the host namespace also records its netns cookie in mbr_sm_ns by 4-tuple.
 *
 * mbr_skmsg (sk_msg, on mbr_sockhash): on sendmsg, the peer key is the mirrored 4-tuple in the peer's
 * namespace: a pod socket's peer is in the host netns (the proxy, mbr_sm_cfg[0]); a host socket's
 * peer is the pod socket found through mbr_sm_ns. The two ends of one TCP connection are the only
 * sockets with mirrored tuples in those namespaces, so the pairing cannot cross connections.
 * If the peer is not in the map (not yet established, or not ours) the message takes the normal
 * path: the accelerator is never needed for correctness.
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>

#ifndef MBR_SOCKHASH_SIZE
#define MBR_SOCKHASH_SIZE 65536
#endif

struct sm_key {
    u32 local_ip[4];
    u32 remote_ip[4];
    u32 local_port;   /* host order */
    u32 remote_port;  /* host order */
    u64 netns;
};

struct sm_tuple {
    u32 local_ip[4];
    u32 remote_ip[4];
    u32 local_port;
    u32 remote_port;
};

BPF_SOCKHASH(mbr_sockhash, struct sm_key, MBR_SOCKHASH_SIZE);
BPF_HASH(mbr_sm_ports, u32, u32, 256);
BPF_TABLE("lru_hash", struct sm_tuple, u64, mbr_sm_ns, MBR_SOCKHASH_SIZE);
BPF_ARRAY(mbr_sm_cfg, u64, 2);   /* [0] = host netns cookie */
BPF_ARRAY(mbr_sm_stats, u64, 4); /* [0] sockets added, [1] messages redirected, [2] no peer */

static __always_inline u32 port_host(u32 raw)
{
    /* remote_port is network order; older kernels also shift it into the upper half */
    if (raw > 0xffff)
        return bpf_ntohl(raw);
    return bpf_ntohs((u16)raw);
}

static __always_inline void stat(u32 idx)
{
    u64 *v = mbr_sm_stats.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline void set_addr(u32 *dst, u32 family, u32 ip4, const u32 *ip6)
{
    if (family == AF_INET) {
        dst[0] = 0;
        dst[1] = 0;
        dst[2] = bpf_htonl(0xffff);
        dst[3] = ip4;
    } else {
        dst[0] = ip6[0];
        dst[1] = ip6[1];
        dst[2] = ip6[2];
        dst[3] = ip6[3];
    }
}

static __always_inline u64 host_netns(void)
{
    u32 idx = 0;
    u64 *v = mbr_sm_cfg.lookup(&idx);
    return v ? *v : 0;
}

int mbr_sockops(struct bpf_sock_ops *skops)
{
    u32 op = skops->op;
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;
    u32 family = skops->family;
    if (family != AF_INET && family != AF_INET6)
        return 1;
    u32 lport = skops->local_port;
    u32 rport = port_host(skops->remote_port);
    if (!mbr_sm_ports.lookup(&lport) && !mbr_sm_ports.lookup(&rport))
        return 1;

    struct sm_key key = {};
    u32 l6[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2], skops->local_ip6[3]};
    u32 r6[4] = {skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2], skops->remote_ip6[3]};
    set_addr(key.local_ip, family, skops->local_ip4, l6);
    set_addr(key.remote_ip, family, skops->remote_ip4, r6);
    key.local_port = lport;
    key.remote_port = rport;
    key.netns = bpf_get_netns_cookie(skops);
    if (key.netns != host_netns()) {
        struct sm_tuple t = {};
        __builtin_memcpy(&t, &key, sizeof(t));
        u64 ns = key.netns;
        mbr_sm_ns.update(&t, &ns);
    }
    long rc = mbr_sockhash.sock_hash_update(skops, &key, BPF_ANY);
    if (rc == 0)
        stat(0);
    return 1;
}

int mbr_skmsg(struct sk_msg_md *msg)
{
    u32 family = msg->family;
    struct sm_key peer = {};
    u32 l6[4] = {msg->local_ip6[0], msg->local_ip6[1], msg->local_ip6[2], msg->local_ip6[3]};
    u32 r6[4] = {msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2], msg->remote_ip6[3]};
    /* the peer's local side is our remote side */
    set_addr(peer.local_ip, family, msg->remote_ip4, r6);
    set_addr(peer.remote_ip, family, msg->local_ip4, l6);
    peer.local_port = port_host(msg->remote_port);
    peer.remote_port = msg->local_port;
    u64 mine = bpf_get_netns_cookie(msg);
    u64 host = host_netns();
    if (mine != host) {
        peer.netns = host;
    } else {
        struct sm_tuple t = {};
        __builtin_memcpy(&t, &peer, sizeof(t));
        u64 *ns = mbr_sm_ns.lookup(&t);
        if (!ns) {
            stat(2);
            return SK_PASS;
        }
        peer.netns = *ns;
    }
    long verdict = mbr_sockhash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS)
        stat(1);
    else
        stat(2);
    return SK_PASS;
}
