/* Membrane tc steering: L3/L4 policy, stateful conntrack and redirection to the transparent proxy.
 *
 * Theory of operation
 * -------------------
 * mbr_tc_steer is attached at tc ingress (clsact, direct-action) on the host side of every pod veth,
 * and optionally on a node device. Every packet that comes FROM a pod is judged here, for both the
 * source pod's egress policy and (when the destination is a local endpoint) the destination pod's
 * ingress policy: bpf_sk_assign only works on ingress, so redirection happens here only.
 * mbr_tc_host (the same code, host_egress = 1) is attached at tc egress of the same veths: it judges
 * what enters a pod without having left another local pod's veth -- traffic the node itself sends
 * (the ipcache maps the node's addresses to identity 1, host) and traffic from other nodes (their
 * identity from the ipcache, unknown = world) -- by the pod's ingress policy. Flows that conntrack
 * knows (judged at a pod veth's ingress) pass; a host socket using a local pod's address is the
 * proxy's upstream (judged by the proxy) and passes. An L7 (REDIRECT) verdict there cannot be
 * sk_assigned (egress) and fails closed: dropped as PROXY_UNAVAILABLE.
 *
 *   1. Parse IPv4/IPv6 (walking up to MBR_V6_EXT_MAX IPv6 extension headers: hop-by-hop, routing,
 *      fragment, destination options, AH) to the L4 header. TCP/UDP/SCTP are judged by destination
 *      port; ICMP/ICMPv6 by type (policy port ICMP_PORT_BASE | type), echo request/reply tracked
 *      by identifier, errors (unreachable, PMTU, time exceeded, parameter problem) pass as
 *      "related" when the packet they quote belongs to a tracked flow; every other protocol (GRE,
 *      ESP, ...) is judged with port 0 for its protocol, so only an L3-only entry allows it.
 *      ICMPv6 neighbour discovery (133-137), MLD (130-132, 143) and non-IP frames (ARP) always pass. An IP packet that
 *      cannot be parsed (truncated, longer extension chain) is dropped (UNPARSEABLE) when the
 *      veth's endpoint has any enforcement, never passed unjudged.
 *      Fragments: the first fragment's ports are remembered by (saddr, daddr, ID, proto) in
 *      mbr_frags once it passes; a later fragment gets them back and is judged as its flow (the
 *      conntrack entry decides). A later fragment with no entry is dropped (FRAG_NOT_FOUND) when
 *      either side enforces (Cilium's IPV4_FRAG_DATAGRAMS_MAP idea, for IPv6 as well).
 *      A packet from an endpoint's veth whose source address the ipcache does not map to that same
 *      ifindex is dropped (SPOOFED): conntrack and identities rely on the source being the pod's own.
 *   2. Conntrack, keyed by the originator's 5-tuple:
 *        hit in the forward direction  -> the flow was allowed before: PASS, or steer to the proxy;
 *        hit in the reverse direction  -> a reply: PASS, or deliver to the proxy's upstream socket.
 *      An entry idle longer than its lifetime (TCP 6 h, UDP 60 s, TCP after FIN/RST 10 s) is
 *      deleted and the packet judged again; the LRU map also evicts the oldest when full.
 *   3. A new flow whose exact tuple already has a local (host netns) socket is a proxy upstream
 *      connection's reply (the proxy may use its own source port): mark + assign it.
 *   4. Otherwise evaluate policy: the source endpoint's egress map, then the destination endpoint's
 *      ingress map. Each lookup tries, first match wins:
 *        (id, port, proto) (id, 0, proto) (id, 0, ANY) (ANY, port, proto) (ANY, 0, proto) (ANY, 0, ANY)
 *      no match -> DROP when that direction is enforced; unenforced direction -> PASS.
 *      DROP wins over REDIRECT wins over PASS; the egress redirect's proxy port wins.
 *   5. Redirect (TCP): look the tuple up; a non-listening socket -> assign it; the proxy's own listener
 *      (a handshake ACK maps to its listener through the request socket) -> mark only, never assign
 *      (assigning the listener again makes the kernel answer with RST); nothing -> assign the proxy's
 *      listener (found by the packet's daddr and the proxy port). UDP forward packets always go to the
 *      proxy's listener; UDP replies go to the connected upstream socket of that tuple.
 *      Every steered packet carries MBR_MARK so that the fwmark rule routes it locally.
 *
 * Policy entries live in two generations (key.gen); the active one is read once per packet from the
 * config map, so a whole-policy swap is one atomic write (see bpf/maps.py).
 * Compile-time knobs: -DMBR_FRAG_SIZE, -DMBR_V6_EXT_MAX, -DMBR_CT_TCP_LIFETIME_S, -DMBR_CT_UDP_LIFETIME_S, -DMBR_CT_CLOSE_LIFETIME_S, -DMBR_CT_SIZE, -DMBR_POLICY_SIZE, -DMBR_IPCACHE_SIZE, -DMBR_EP_SIZE,
 * -DMBR_WORLD_ID, -DMBR_RINGBUF_PAGES, -DMBR_PIN_DIR (a string: pin the policy maps there).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#ifndef MBR_CT_SIZE
#define MBR_CT_SIZE 65536
#endif
#ifndef MBR_POLICY_SIZE
#define MBR_POLICY_SIZE 16384
#endif
#ifndef MBR_IPCACHE_SIZE
#define MBR_IPCACHE_SIZE 16384
#endif
#ifndef MBR_EP_SIZE
#define MBR_EP_SIZE 1024
#endif
#ifndef MBR_WORLD_ID
#define MBR_WORLD_ID 2
#endif
#define MBR_HOST_ID 1  /* reserved:host, the identity the ipcache gives the node's own addresses */
#ifndef MBR_CT_TCP_LIFETIME_S
#define MBR_CT_TCP_LIFETIME_S 21600
#endif
#ifndef MBR_CT_UDP_LIFETIME_S
#define MBR_CT_UDP_LIFETIME_S 60
#endif
#ifndef MBR_CT_CLOSE_LIFETIME_S
#define MBR_CT_CLOSE_LIFETIME_S 10
#endif
#ifndef MBR_RINGBUF_PAGES
#define MBR_RINGBUF_PAGES 16
#endif
#ifndef MBR_FRAG_SIZE
#define MBR_FRAG_SIZE 8192
#endif
#ifndef MBR_V6_EXT_MAX
#define MBR_V6_EXT_MAX 6
#endif

#define VERDICT_NONE 0
#define VERDICT_PASS 1
#define VERDICT_DROP 2
#define VERDICT_REDIRECT 3

#define ENFORCE_INGRESS 1
#define ENFORCE_EGRESS 2

#define REASON_EGRESS_DENIED 1
#define REASON_INGRESS_DENIED 2
#define REASON_PROXY_UNAVAILABLE 3
#define REASON_SPOOFED 4
#define REASON_FRAG_NOT_FOUND 5  /* a non-first fragment whose first fragment was not seen (or was dropped) */
#define REASON_UNPARSEABLE 6     /* an IP packet whose headers cannot be parsed (e.g. too many IPv6 extension headers) */
#define REASON_MAX 8

#define CFG_MARK 0
#define CFG_GEN 1
#define CFG_TCP4_PORT 2
#define CFG_TCP6_PORT 3
#define CFG_UDP4_PORT 4
#define CFG_UDP6_PORT 5
#define CFG_TW_STEER 6   /* 1 = mbr_sk_lookup is attached to the host netns: SYNs hitting a TIME_WAIT go through it */
#define CFG_MAX 8

#define TCP_LISTEN_STATE 10
#define TCP_TIME_WAIT_STATE 6

struct ipc4_key {
    u32 prefixlen;
    u32 addr;
};
struct ipc6_key {
    u32 prefixlen;
    u8 addr[16];
};
struct ipc_val {
    u32 identity;
    u32 ifindex;   /* host-side ifindex of a local endpoint, 0 = not local */
};
struct ep_val {
    u32 ep_id;
    u32 identity;
    u32 flags;     /* ENFORCE_INGRESS | ENFORCE_EGRESS; 0 = no policy selects it: allow all */
};
struct pol_key {
    u32 ep_id;
    u32 identity;  /* 0 = any identity */
    u16 dport;     /* host order, 0 = any port */
    u8 proto;      /* IPPROTO_TCP/UDP, 0 = any */
    u8 gen;        /* policy generation 0/1 */
};
struct pol_val {
    u16 proxy_port; /* host order; 0 = the configured default listener */
    u8 verdict;
    u8 pad;
};
struct ct_key {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;     /* network order */
    u16 dport;
    u8 proto;
    u8 family;
    u16 pad;
};
struct ct_val {
    u64 created_ns;
    u64 last_seen_ns;  /* refreshed at most once a second */
    u32 src_id;
    u32 dst_id;
    u16 proxy_port;
    u8 verdict;
    u8 closing;        /* a FIN or RST was seen: the short close lifetime applies */
    u32 pad;
};
struct drop_event {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;     /* host order */
    u16 dport;
    u8 proto;
    u8 family;
    u8 reason;
    u8 pad;
    u32 src_id;
    u32 dst_id;
    u32 ifindex;
};

/* The maps the policy lives in. With -DMBR_PIN_DIR="/sys/fs/bpf/membrane" each is pinned there as
 * <dir>/<name>: bcc reuses a pin that exists (so a restarted agent adopts the policy, conntrack and
 * counters the old programs keep enforcing) and pins the map it creates otherwise. bcc does not check
 * that a reused pin matches this declaration; bpf/pins.py does, and replaces the pins that differ.
 * mbr_events is never pinned: each program gets its own ring, and the reader is the agent. */
#ifdef MBR_PIN_DIR
#define MBR_MAP(TYPE, KEY, VAL, NAME, SIZE, FLAGS) \
    BPF_TABLE_PINNED7(TYPE, KEY, VAL, NAME, SIZE, MBR_PIN_DIR "/" #NAME, FLAGS)
#else
#define MBR_MAP(TYPE, KEY, VAL, NAME, SIZE, FLAGS) BPF_F_TABLE(TYPE, KEY, VAL, NAME, SIZE, FLAGS)
#endif
MBR_MAP("lpm_trie", struct ipc4_key, struct ipc_val, mbr_ipc4, MBR_IPCACHE_SIZE, BPF_F_NO_PREALLOC);
MBR_MAP("lpm_trie", struct ipc6_key, struct ipc_val, mbr_ipc6, MBR_IPCACHE_SIZE, BPF_F_NO_PREALLOC);
MBR_MAP("hash", u32, struct ep_val, mbr_endpoints, MBR_EP_SIZE, 0);
MBR_MAP("hash", struct pol_key, struct pol_val, mbr_pol_egr, MBR_POLICY_SIZE, 0);
MBR_MAP("hash", struct pol_key, struct pol_val, mbr_pol_ing, MBR_POLICY_SIZE, 0);
MBR_MAP("lru_hash", struct ct_key, struct ct_val, mbr_ct, MBR_CT_SIZE, 0);
MBR_MAP("percpu_array", int, u64, mbr_drops, REASON_MAX, 0);
MBR_MAP("array", int, u32, mbr_config, CFG_MAX, 0);
BPF_RINGBUF_OUTPUT(mbr_events, MBR_RINGBUF_PAGES);

struct frag_key {
    u8 saddr[16];
    u8 daddr[16];
    u32 id;        /* IPv4: the 16-bit IP ID; IPv6: the fragment header's 32-bit identification */
    u8 proto;
    u8 family;
    u16 pad;
};
struct frag_val {
    u16 sport;     /* network order, as in ct_key (ICMP echo: the identifier) */
    u16 dport;
    u16 pol_port;  /* host order: the policy key port of the datagram */
    u8 kind;
    u8 proto;      /* the L4 protocol (IPv6: extension headers may follow the fragment header) */
};
/* The ports of the first fragment of every datagram that passed: non-first fragments carry no L4
 * header and get the flow of their first fragment (Cilium's IPV4_FRAG_DATAGRAMS_MAP idea). Not
 * pinned: a datagram in flight during an agent restart loses its later fragments (the sender retries). */
BPF_F_TABLE("lru_hash", struct frag_key, struct frag_val, mbr_frags, MBR_FRAG_SIZE, 0);

/* SYNs of steered flows whose tuple still has a TIME_WAIT socket in the host netns (the proxy closed that
 * pod-facing connection first): forward tuple -> the proxy listener's port. mbr_tc_steer assigns the
 * TIME_WAIT socket, so the kernel's own TIME_WAIT handling accepts the SYN and looks up a listener for
 * it, which mbr_sk_lookup (attached to the host netns) answers with the proxy's listener from
 * mbr_listen: the TIME_WAIT socket is retired and the connection proceeds as a new one, as it would
 * for a real server (and as netfilter TPROXY does by hand). Entries are consumed by mbr_sk_lookup. */
#ifndef MBR_TW_SIZE
#define MBR_TW_SIZE 16384
#endif
struct tw_val {
    u16 port;  /* host order: the proxy listener's port */
    u16 pad;
};
BPF_F_TABLE("lru_hash", struct ct_key, struct tw_val, mbr_tw, MBR_TW_SIZE, 0);
/* The proxy's TCP listeners for mbr_sk_lookup: key (family << 16) | port, value the socket (the agent
 * inserts its listener fds). */
BPF_TABLE("sockhash", u32, int, mbr_listen, 8);  /* BPF_SOCKHASH has no lookup() */

#define P_OK 0
#define P_SKIP 1  /* not IP, or ICMPv6 neighbour discovery: never judged */
#define P_BAD 2   /* an IP packet we cannot parse (truncated, too many extension headers) */

#define KIND_PORTS 0      /* TCP, UDP, SCTP: ports */
#define KIND_ECHO 1       /* ICMP(v6) echo request/reply: the identifier stands in for the ports */
#define KIND_ICMP_ERR 2   /* ICMP(v6) error: carries the header of the packet it is about */
#define KIND_ICMP 3       /* any other ICMP(v6) type: judged per packet, no conntrack */
#define KIND_OTHER 4      /* GRE, ESP, ...: ports 0 */

#define FRAG_NONE 0
#define FRAG_FIRST 1
#define FRAG_LATER 2

#define ICMP_PORT_BASE 0x100  /* policy key port of an ICMP type: 0x100 | type (0 stays "any") */

struct pkt {
    struct ct_key key;        /* as seen on the wire: saddr/sport = sender */
    struct bpf_sock_tuple tuple;
    struct ct_key inner;      /* KIND_ICMP_ERR: the embedded packet's tuple (family 0 = none) */
    u32 frag_id;
    u8 frag_proto;            /* IPv4: the protocol; IPv6: the fragment header's next header */
    u16 pol_port;             /* host order: the port policy is looked up with */
    u8 tcp_flags;
    u8 kind;
    u8 frag;
};

static __always_inline u32 cfg(u32 idx)
{
    u32 *v = mbr_config.lookup(&idx);
    return v ? *v : 0;
}

static __always_inline void set_ports(struct pkt *p, u16 sport, u16 dport)
{
    p->key.sport = sport;
    p->key.dport = dport;
    if (p->key.family == 4) {
        p->tuple.ipv4.sport = sport;
        p->tuple.ipv4.dport = dport;
    } else {
        p->tuple.ipv6.sport = sport;
        p->tuple.ipv6.dport = dport;
    }
}

static __always_inline int is_ports_proto(u8 proto)
{
    return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* The tuple of the packet an ICMP error quotes (its IP header + at least 8 bytes of L4). */
static __always_inline void parse_inner(struct __sk_buff *skb, struct pkt *p, u32 off)
{
    struct ct_key *k = &p->inner;
    u32 l4off;
    if (p->key.family == 4) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
            return;
        if (ip.frag_off & bpf_htons(0x1fff))
            return;
        k->proto = ip.protocol;
        __builtin_memcpy(k->saddr, &ip.saddr, 4);
        __builtin_memcpy(k->daddr, &ip.daddr, 4);
        l4off = off + ip.ihl * 4;
    } else {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
            return;
        k->proto = ip6.nexthdr;
        __builtin_memcpy(k->saddr, &ip6.saddr, 16);
        __builtin_memcpy(k->daddr, &ip6.daddr, 16);
        l4off = off + sizeof(ip6);
    }
    u8 l4[8];
    if (bpf_skb_load_bytes(skb, l4off, l4, sizeof(l4)) < 0)
        return;
    u8 icmp = p->key.family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
    if (is_ports_proto(k->proto)) {
        __builtin_memcpy(&k->sport, &l4[0], 2);
        __builtin_memcpy(&k->dport, &l4[2], 2);
    } else if (k->proto == icmp && (l4[0] == 8 || l4[0] == 128)) {
        __builtin_memcpy(&k->sport, &l4[4], 2);  /* a quoted echo request: its identifier */
        k->dport = 0;
    } else {
        return;
    }
    k->family = p->key.family;
}

/* The L4 part: ports, or the ICMP type (and echo identifier), or nothing for other protocols. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p, u32 off)
{
    u8 proto = p->key.proto;
    if (is_ports_proto(proto)) {
        u16 ports[2];
        if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
            return P_BAD;
        set_ports(p, ports[0], ports[1]);
        p->kind = KIND_PORTS;
        p->pol_port = bpf_ntohs(ports[1]);
        if (proto == IPPROTO_TCP) {
            u8 flags;
            if (bpf_skb_load_bytes(skb, off + 13, &flags, 1) < 0)
                return P_BAD;
            p->tcp_flags = flags;
        }
        return P_OK;
    }
    int v4icmp = p->key.family == 4 && proto == IPPROTO_ICMP;
    int v6icmp = p->key.family == 6 && proto == IPPROTO_ICMPV6;
    if (!v4icmp && !v6icmp) {
        p->kind = KIND_OTHER;  /* judged with port 0 for its protocol */
        return P_OK;
    }
    u8 h[8];  /* type, code, checksum, identifier, sequence */
    if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
        return P_BAD;
    u8 type = h[0];
    u16 ident;
    __builtin_memcpy(&ident, &h[4], 2);
    p->pol_port = ICMP_PORT_BASE | type;
    if (v6icmp && type >= 133 && type <= 137)
        return P_SKIP;  /* neighbour discovery (RS, RA, NS, NA, redirect) always passes, as in Cilium */
    if (v6icmp && ((type >= 130 && type <= 132) || type == 143))
        return P_SKIP;  /* multicast listener discovery: link-local control traffic, never routed */
    if ((v4icmp && type == 8) || (v6icmp && type == 128)) {
        p->kind = KIND_ECHO;
        p->key.sport = ident;  /* request: the identifier is the "source port" */
        return P_OK;
    }
    if ((v4icmp && type == 0) || (v6icmp && type == 129)) {
        p->kind = KIND_ECHO;
        p->key.dport = ident;  /* reply: reversed, so it finds its request's conntrack entry */
        return P_OK;
    }
    if ((v4icmp && (type == 3 || type == 11 || type == 12)) || (v6icmp && type >= 1 && type <= 4)) {
        p->kind = KIND_ICMP_ERR;
        parse_inner(skb, p, off + 8);
        return P_OK;
    }
    p->kind = KIND_ICMP;
    return P_OK;
}

static __always_inline int is_v6_ext(u8 nh)
{
    return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_FRAGMENT ||
           nh == IPPROTO_DSTOPTS || nh == IPPROTO_AH;
}

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
    __builtin_memset(p, 0, sizeof(*p));
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
            return P_BAD;
        p->key.family = 4;
        p->key.proto = ip.protocol;
        __builtin_memcpy(p->key.saddr, &ip.saddr, 4);
        __builtin_memcpy(p->key.daddr, &ip.daddr, 4);
        p->tuple.ipv4.saddr = ip.saddr;
        p->tuple.ipv4.daddr = ip.daddr;
        u16 fo = bpf_ntohs(ip.frag_off);
        p->frag_proto = ip.protocol;
        if (fo & 0x1fff) {  /* non-first fragment: no L4 header; its first fragment's flow decides */
            p->frag = FRAG_LATER;
            p->frag_id = bpf_ntohs(ip.id);
            return P_OK;
        }
        if (fo & 0x2000) {  /* MF: the first fragment of a datagram */
            p->frag = FRAG_FIRST;
            p->frag_id = bpf_ntohs(ip.id);
        }
        return parse_l4(skb, p, ETH_HLEN + ip.ihl * 4);
    }
    if (skb->protocol != bpf_htons(ETH_P_IPV6))
        return P_SKIP;
    struct ipv6hdr ip6;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
        return P_BAD;
    p->key.family = 6;
    __builtin_memcpy(p->key.saddr, &ip6.saddr, 16);
    __builtin_memcpy(p->key.daddr, &ip6.daddr, 16);
    __builtin_memcpy(p->tuple.ipv6.saddr, &ip6.saddr, 16);
    __builtin_memcpy(p->tuple.ipv6.daddr, &ip6.daddr, 16);
    u8 nh = ip6.nexthdr;
    u32 off = ETH_HLEN + sizeof(ip6);
    /* Walk the extension headers to the L4 header, at most MBR_V6_EXT_MAX of them (Cilium: 4). */
#pragma unroll
    for (int i = 0; i < MBR_V6_EXT_MAX; i++) {
        if (!is_v6_ext(nh))
            break;
        u8 h[8];
        if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
            return P_BAD;
        if (nh == IPPROTO_FRAGMENT) {
            u16 fo;
            u32 id;
            __builtin_memcpy(&fo, &h[2], 2);
            __builtin_memcpy(&id, &h[4], 4);
            fo = bpf_ntohs(fo);
            p->frag_id = bpf_ntohl(id);
            nh = h[0];
            p->frag_proto = nh;
            if (fo & 0xfff8) {  /* non-first fragment: the rest of the chain is not here */
                p->frag = FRAG_LATER;
                p->key.proto = nh;
                return P_OK;
            }
            if (fo & 1)
                p->frag = FRAG_FIRST;
            off += 8;
        } else if (nh == IPPROTO_AH) {
            nh = h[0];
            off += ((u32)h[1] + 2) * 4;
        } else {
            nh = h[0];
            off += ((u32)h[1] + 1) * 8;
        }
    }
    if (is_v6_ext(nh))
        return P_BAD;  /* a longer chain than we walk: never a free pass */
    p->key.proto = nh;
    return parse_l4(skb, p, off);
}

#define NSEC 1000000000ULL
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* An entry idle longer than its lifetime is dead: the packet is judged again as a new flow. */
static __always_inline int ct_alive(struct ct_val *ct, const struct pkt *p, u64 now)
{
    u64 life = MBR_CT_UDP_LIFETIME_S * NSEC;
    if (p->key.proto == IPPROTO_TCP)
        life = ct->closing ? MBR_CT_CLOSE_LIFETIME_S * NSEC : MBR_CT_TCP_LIFETIME_S * NSEC;
    u64 idle = now > ct->last_seen_ns ? now - ct->last_seen_ns : 0;
    if (idle > life)
        return 0;
    if (p->key.proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FIN | TCP_RST)) && !ct->closing) {
        ct->closing = 1;
        ct->last_seen_ns = now;
    } else if (idle > NSEC) {
        ct->last_seen_ns = now;
    }
    return 1;
}

static __always_inline void reverse_key(const struct ct_key *k, struct ct_key *r)
{
    __builtin_memcpy(r->saddr, k->daddr, 16);
    __builtin_memcpy(r->daddr, k->saddr, 16);
    r->sport = k->dport;
    r->dport = k->sport;
    r->proto = k->proto;
    r->family = k->family;
    r->pad = 0;
}

static __always_inline struct ipc_val *ipcache(const struct ct_key *k, int dst)
{
    const u8 *a = dst ? k->daddr : k->saddr;
    if (k->family == 4) {
        struct ipc4_key key = {.prefixlen = 32};
        __builtin_memcpy(&key.addr, a, 4);
        return mbr_ipc4.lookup(&key);
    }
    struct ipc6_key key6 = {.prefixlen = 128};
    __builtin_memcpy(key6.addr, a, 16);
    return mbr_ipc6.lookup(&key6);
}

static __always_inline struct pol_val *pol_get(struct pol_key *k, int egress)
{
    if (egress)
        return mbr_pol_egr.lookup(k);
    return mbr_pol_ing.lookup(k);
}

/* First match wins: (id,port,proto) (id,0,proto) (id,0,0) (0,port,proto) (0,0,proto) (0,0,0). */
static __always_inline struct pol_val *policy_lookup(u32 ep_id, u32 identity, u16 dport,
                                                      u8 proto, u8 gen, int egress)
{
    struct pol_key k = {.ep_id = ep_id, .identity = identity, .dport = dport, .proto = proto, .gen = gen};
    struct pol_val *v;
#define TRY(ID, PORT, PROTO)                                                              \
    k.identity = ID;                                                                      \
    k.dport = PORT;                                                                       \
    k.proto = PROTO;                                                                      \
    v = pol_get(&k, egress);                                                              \
    if (v)                                                                                \
        return v;
    TRY(identity, dport, proto)
    TRY(identity, 0, proto)
    TRY(identity, 0, 0)
    TRY(0, dport, proto)
    TRY(0, 0, proto)
    TRY(0, 0, 0)
#undef TRY
    return NULL;
}

static __always_inline void count_drop(u32 reason)
{
    u64 *c = mbr_drops.lookup(&reason);
    if (c)
        *c += 1;
}

static __always_inline int drop(struct __sk_buff *skb, const struct pkt *p, u32 reason, u32 src_id,
                                u32 dst_id)
{
    count_drop(reason);
    struct drop_event *e = mbr_events.ringbuf_reserve(sizeof(struct drop_event));
    if (e) {
        __builtin_memcpy(e->saddr, p->key.saddr, 16);
        __builtin_memcpy(e->daddr, p->key.daddr, 16);
        e->sport = bpf_ntohs(p->key.sport);
        e->dport = bpf_ntohs(p->key.dport);
        e->proto = p->key.proto;
        e->family = p->key.family;
        e->reason = reason;
        e->pad = 0;
        e->src_id = src_id;
        e->dst_id = dst_id;
        e->ifindex = skb->ifindex;
        mbr_events.ringbuf_submit(e, 0);
    }
    return TC_ACT_SHOT;
}

/* The helpers need a constant tuple size, so every lookup branches on the family. */
static __always_inline struct bpf_sock *sk_tcp(struct __sk_buff *skb, struct bpf_sock_tuple *t, u8 family)
{
    if (family == 4)
        return bpf_sk_lookup_tcp(skb, t, sizeof(t->ipv4), BPF_F_CURRENT_NETNS, 0);
    return bpf_sk_lookup_tcp(skb, t, sizeof(t->ipv6), BPF_F_CURRENT_NETNS, 0);
}

static __always_inline struct bpf_sock *sk_udp(struct __sk_buff *skb, struct bpf_sock_tuple *t, u8 family)
{
    if (family == 4)
        return bpf_sk_lookup_udp(skb, t, sizeof(t->ipv4), BPF_F_CURRENT_NETNS, 0);
    return bpf_sk_lookup_udp(skb, t, sizeof(t->ipv6), BPF_F_CURRENT_NETNS, 0);
}

static __always_inline struct bpf_sock *lookup_sock(struct __sk_buff *skb, struct pkt *p)
{
    if (p->key.proto == IPPROTO_TCP)
        return sk_tcp(skb, &p->tuple, p->key.family);
    return sk_udp(skb, &p->tuple, p->key.family);
}

static __always_inline u16 default_proxy_port(const struct pkt *p)
{
    if (p->key.proto == IPPROTO_TCP)
        return cfg(p->key.family == 4 ? CFG_TCP4_PORT : CFG_TCP6_PORT);
    return cfg(p->key.family == 4 ? CFG_UDP4_PORT : CFG_UDP6_PORT);
}

/* Assign the proxy's listener on `port` (found through the packet's own daddr). */
static __always_inline int assign_listener(struct __sk_buff *skb, struct pkt *p, u16 port, u32 src_id,
                                           u32 dst_id)
{
    struct bpf_sock_tuple t = p->tuple;
    if (p->key.family == 4)
        t.ipv4.dport = bpf_htons(port);
    else
        t.ipv6.dport = bpf_htons(port);
    struct bpf_sock *sk;
    if (p->key.proto == IPPROTO_TCP)
        sk = sk_tcp(skb, &t, p->key.family);
    else
        sk = sk_udp(skb, &t, p->key.family);
    if (!sk)
        return drop(skb, p, REASON_PROXY_UNAVAILABLE, src_id, dst_id);
    if (sk->src_port != port || (p->key.proto == IPPROTO_TCP && sk->state != TCP_LISTEN_STATE)) {
        bpf_sk_release(sk);
        return drop(skb, p, REASON_PROXY_UNAVAILABLE, src_id, dst_id);
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return drop(skb, p, REASON_PROXY_UNAVAILABLE, src_id, dst_id);
    skb->mark = cfg(CFG_MARK);
    return TC_ACT_OK;
}

/* A new connection's SYN whose tuple has a TIME_WAIT socket of a previous connection in this netns (the
 * proxy closed that one first): assigning the listener would make the kernel drop the SYN (the request
 * socket collides with the TIME_WAIT entry), so assign the TIME_WAIT socket itself and let mbr_sk_lookup
 * find the listener when the kernel's TIME_WAIT handling asks (see mbr_tw). Returns 1 when assigned. */
static __always_inline int steer_time_wait(struct __sk_buff *skb, struct pkt *p, u16 port)
{
    if ((p->tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN || !cfg(CFG_TW_STEER))
        return 0;
    struct bpf_sock *tw;
    if (p->key.family == 4)
        tw = bpf_skc_lookup_tcp(skb, &p->tuple, sizeof(p->tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    else
        tw = bpf_skc_lookup_tcp(skb, &p->tuple, sizeof(p->tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
    if (!tw)
        return 0;
    if (tw->state != TCP_TIME_WAIT_STATE) {
        bpf_sk_release(tw);
        return 0;
    }
    struct tw_val v = {};
    v.port = port;
    mbr_tw.update(&p->key, &v);
    long err = bpf_sk_assign(skb, tw, 0);
    bpf_sk_release(tw);
    if (err) {
        mbr_tw.delete(&p->key);
        return 0;
    }
    skb->mark = cfg(CFG_MARK);
    return 1;
}

/* A packet of a redirected flow in the originator's direction. */
static __always_inline int steer_forward(struct __sk_buff *skb, struct pkt *p, u16 port, u32 src_id,
                                         u32 dst_id)
{
    if (!port)
        port = default_proxy_port(p);
    if (p->key.proto == IPPROTO_TCP) {
        struct bpf_sock *sk = sk_tcp(skb, &p->tuple, p->key.family);
        if (sk) {
            if (sk->state != TCP_LISTEN_STATE) {
                /* the proxy's accepted socket for this connection */
                bpf_sk_assign(skb, sk, 0);
                bpf_sk_release(sk);
                skb->mark = cfg(CFG_MARK);
                return TC_ACT_OK;
            }
            if (sk->src_port == port) {
                /* handshake ACK / SYN retransmit: the request socket's listener. Never re-assign. */
                bpf_sk_release(sk);
                skb->mark = cfg(CFG_MARK);
                return TC_ACT_OK;
            }
            bpf_sk_release(sk);  /* some other wildcard listener: not ours */
        } else if (steer_time_wait(skb, p, port)) {
            return TC_ACT_OK;
        }
    }
    return assign_listener(skb, p, port, src_id, dst_id);
}

/* A reply of a redirected flow: goes to the proxy's upstream socket for this tuple, if any. */
static __always_inline int steer_reply(struct __sk_buff *skb, struct pkt *p)
{
    struct bpf_sock *sk = lookup_sock(skb, p);
    if (sk) {
        if (p->key.proto != IPPROTO_TCP || sk->state != TCP_LISTEN_STATE)
            bpf_sk_assign(skb, sk, 0);
        bpf_sk_release(sk);
    }
    /* Without a socket the local stack answers (RST / port unreachable): the flow fails closed. */
    skb->mark = cfg(CFG_MARK);
    return TC_ACT_OK;
}

/* Returns 1 and assigns when the exact tuple has a connected host socket (a proxy upstream reply). */
static __always_inline int owned_by_local_socket(struct __sk_buff *skb, struct pkt *p)
{
    struct bpf_sock *sk = lookup_sock(skb, p);
    if (!sk)
        return 0;
    int ours = sk->dst_port != 0 && (p->key.proto != IPPROTO_TCP || sk->state != TCP_LISTEN_STATE);
    if (ours)
        bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (ours)
        skb->mark = cfg(CFG_MARK);
    return ours;
}

static __always_inline int enforces(struct ep_val *src_ep, struct ep_val *dst_ep)
{
    return (src_ep && (src_ep->flags & ENFORCE_EGRESS)) || (dst_ep && (dst_ep->flags & ENFORCE_INGRESS));
}

/* Conntrack says whether the flow (or, for an ICMP error, the flow it is about) was allowed before.
 * Returns -1 when it has no answer: the packet is a new flow, judged by policy. */
static __always_inline int ct_verdict(struct __sk_buff *skb, struct pkt *p, int host_egress, u64 now)
{
    struct ct_val *ct = mbr_ct.lookup(&p->key);
    if (ct) {
        if (ct_alive(ct, p, now)) {
            if (ct->verdict == VERDICT_REDIRECT && !host_egress)
                return steer_forward(skb, p, ct->proxy_port, ct->src_id, ct->dst_id);
            return TC_ACT_OK;  /* at the host egress hook the flow was steered (or passed) at its start */
        }
        mbr_ct.delete(&p->key);
    }
    struct ct_key rkey;
    reverse_key(&p->key, &rkey);
    ct = mbr_ct.lookup(&rkey);
    if (ct) {
        if (ct_alive(ct, p, now)) {
            if (ct->verdict == VERDICT_REDIRECT && !host_egress)
                return steer_reply(skb, p);
            return TC_ACT_OK;
        }
        mbr_ct.delete(&rkey);
    }
    if (p->kind == KIND_ICMP_ERR && p->inner.family) {
        /* "related": an error about a tracked flow (unreachable, PMTU fragmentation needed / packet
         * too big, time exceeded) passes, whichever direction the quoted packet went. */
        if (mbr_ct.lookup(&p->inner))
            return TC_ACT_OK;
        reverse_key(&p->inner, &rkey);
        if (mbr_ct.lookup(&rkey))
            return TC_ACT_OK;
    }
    return -1;
}

/* The verdict for a packet with both endpoints resolved: conntrack first, then policy. */
static __always_inline int decide(struct __sk_buff *skb, struct pkt *p, int host_egress, struct ep_val *src_ep,
                                  struct ep_val *dst_ep, u32 src_id, u32 dst_id)
{
    u64 now = bpf_ktime_get_ns();
    int r = ct_verdict(skb, p, host_egress, now);
    if (r >= 0)
        return r;

    int sockets = p->kind == KIND_PORTS && (p->key.proto == IPPROTO_TCP || p->key.proto == IPPROTO_UDP);
    if (!host_egress) {
        if (sockets && owned_by_local_socket(skb, p))
            return TC_ACT_OK;
    } else if (skb->sk && src_id != MBR_HOST_ID) {
        /* A host socket sending from an address that is not the node's: only IP_TRANSPARENT allows
         * that, i.e. the proxy's upstream connection bound to its client's address (a local pod's
         * or a remote one's). The client's flow was judged where it entered and by the proxy. The
         * node's own connections come from its addresses (identity host) and are judged below. */
        return TC_ACT_OK;
    }

    u8 gen = cfg(CFG_GEN) & 1;
    u16 port = p->pol_port;
    u8 verdict = VERDICT_PASS;
    u16 proxy_port = 0;
    if (src_ep && (src_ep->flags & ENFORCE_EGRESS)) {
        struct pol_val *v = policy_lookup(src_ep->ep_id, dst_id, port, p->key.proto, gen, 1);
        if (!v || v->verdict == VERDICT_DROP)
            return drop(skb, p, REASON_EGRESS_DENIED, src_id, dst_id);
        if (v->verdict == VERDICT_REDIRECT) {
            verdict = VERDICT_REDIRECT;
            proxy_port = v->proxy_port;
        }
    }
    if (dst_ep && (dst_ep->flags & ENFORCE_INGRESS)) {
        struct pol_val *v = policy_lookup(dst_ep->ep_id, src_id, port, p->key.proto, gen, 0);
        if (!v || v->verdict == VERDICT_DROP)
            return drop(skb, p, REASON_INGRESS_DENIED, src_id, dst_id);
        if (v->verdict == VERDICT_REDIRECT && verdict != VERDICT_REDIRECT) {
            verdict = VERDICT_REDIRECT;
            proxy_port = v->proxy_port;
        }
    }
    /* The proxy is reached by bpf_sk_assign, which works at tc ingress only, and for TCP/UDP only:
     * an L7 port reached through the host egress hook (host or remote traffic into a pod) fails closed. */
    if (verdict == VERDICT_REDIRECT && (host_egress || !sockets))
        return drop(skb, p, REASON_PROXY_UNAVAILABLE, src_id, dst_id);
    if (p->kind == KIND_ICMP_ERR || p->kind == KIND_ICMP)
        return TC_ACT_OK;  /* judged per packet: no flow to remember */

    struct ct_val nv = {};
    nv.created_ns = now;
    nv.last_seen_ns = now;
    nv.src_id = src_id;
    nv.dst_id = dst_id;
    nv.proxy_port = proxy_port;
    nv.verdict = verdict;
    mbr_ct.update(&p->key, &nv);
    if (verdict == VERDICT_REDIRECT)
        return steer_forward(skb, p, proxy_port, src_id, dst_id);
    return TC_ACT_OK;
}

/* One packet at either hook. host_egress = 0: tc ingress of a pod's host-side veth (the packet comes
 * from the pod) or of a node device; 1: tc egress of a pod's host-side veth (the packet goes into
 * the pod: from the host itself, from another node, or forwarded from a local pod). */
static __always_inline int judge(struct __sk_buff *skb, int host_egress)
{
    struct pkt p;
    int r = parse(skb, &p);
    if (r == P_SKIP)
        return TC_ACT_OK;

    u32 ifindex = skb->ifindex;
    /* ingress hook: the source endpoint; host egress hook: the destination endpoint */
    struct ep_val *here = mbr_endpoints.lookup(&ifindex);
    if (r == P_BAD) {
        if (here && here->flags)
            return drop(skb, &p, REASON_UNPARSEABLE, host_egress ? MBR_WORLD_ID : here->identity,
                        host_egress ? here->identity : MBR_WORLD_ID);
        return TC_ACT_OK;
    }
    struct ipc_val *sip = ipcache(&p.key, 0);
    if (!host_egress && here && (!sip || sip->ifindex != ifindex))
        return drop(skb, &p, REASON_SPOOFED, here->identity, MBR_WORLD_ID);
    struct ipc_val *dip = ipcache(&p.key, 1);

    struct ep_val *src_ep = NULL, *dst_ep = NULL;
    if (host_egress) {
        dst_ep = here;
        if (sip && sip->ifindex) {
            u32 sidx = sip->ifindex;
            src_ep = mbr_endpoints.lookup(&sidx);
        }
    } else {
        src_ep = here;
        if (dip && dip->ifindex) {
            u32 didx = dip->ifindex;
            dst_ep = mbr_endpoints.lookup(&didx);
        }
    }
    if (!src_ep && !dst_ep)
        return TC_ACT_OK;  /* neither side is a local endpoint: not ours to judge */

    u32 src_id = MBR_WORLD_ID, dst_id = MBR_WORLD_ID;
    if (src_ep)
        src_id = src_ep->identity;
    else if (sip)
        src_id = sip->identity;
    if (dst_ep && host_egress)
        dst_id = dst_ep->identity;
    else if (dip)
        dst_id = dip->identity;

    if (p.frag == FRAG_LATER) {
        struct frag_key fk = {};
        __builtin_memcpy(fk.saddr, p.key.saddr, 16);
        __builtin_memcpy(fk.daddr, p.key.daddr, 16);
        fk.id = p.frag_id;
        fk.proto = p.frag_proto;
        fk.family = p.key.family;
        struct frag_val *fv = mbr_frags.lookup(&fk);
        if (!fv) {
            if (enforces(src_ep, dst_ep))
                return drop(skb, &p, REASON_FRAG_NOT_FOUND, src_id, dst_id);
            return TC_ACT_OK;
        }
        p.key.proto = fv->proto;
        set_ports(&p, fv->sport, fv->dport);
        p.pol_port = fv->pol_port;
        p.kind = fv->kind;
    }

    int verdict_ret = decide(skb, &p, host_egress, src_ep, dst_ep, src_id, dst_id);
    if (p.frag == FRAG_FIRST && verdict_ret == TC_ACT_OK) {
        struct frag_key fk = {};
        __builtin_memcpy(fk.saddr, p.key.saddr, 16);
        __builtin_memcpy(fk.daddr, p.key.daddr, 16);
        fk.id = p.frag_id;
        fk.proto = p.frag_proto;
        fk.family = p.key.family;
        struct frag_val fv = {};
        fv.sport = p.key.sport;
        fv.dport = p.key.dport;
        fv.pol_port = p.pol_port;
        fv.kind = p.kind;
        fv.proto = p.key.proto;
        mbr_frags.update(&fk, &fv);
    }
    return verdict_ret;
}

int mbr_tc_steer(struct __sk_buff *skb)
{
    return judge(skb, 0);
}

/* tc egress of a pod's host-side veth: what enters the pod without having left another local pod's
 * veth (host-originated, from other nodes) is judged here by the pod's ingress policy. */
int mbr_tc_host(struct __sk_buff *skb)
{
    return judge(skb, 1);
}

/* BPF_PROG_TYPE_SK_LOOKUP on the host netns: runs on every listener lookup of the node, acts only on a
 * tuple mbr_tc_steer put in mbr_tw (a SYN that met a TIME_WAIT socket of the proxy) and selects the
 * proxy's listener for it. Everything else: SK_PASS without a selection, the kernel's own lookup. */
int mbr_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    struct ct_key k = {};
    u32 family = ctx->family;
    if (family == 2) {
        u32 rip = ctx->remote_ip4, lip = ctx->local_ip4;
        __builtin_memcpy(k.saddr, &rip, 4);
        __builtin_memcpy(k.daddr, &lip, 4);
        k.family = 4;
    } else if (family == 10) {
        u32 a[4];
        a[0] = ctx->remote_ip6[0];
        a[1] = ctx->remote_ip6[1];
        a[2] = ctx->remote_ip6[2];
        a[3] = ctx->remote_ip6[3];
        __builtin_memcpy(k.saddr, a, 16);
        a[0] = ctx->local_ip6[0];
        a[1] = ctx->local_ip6[1];
        a[2] = ctx->local_ip6[2];
        a[3] = ctx->local_ip6[3];
        __builtin_memcpy(k.daddr, a, 16);
        k.family = 6;
    } else {
        return SK_PASS;
    }
    k.sport = (u16)ctx->remote_port;  /* network order */
    k.dport = bpf_htons((u16)ctx->local_port);
    k.proto = IPPROTO_TCP;
    struct tw_val *v = mbr_tw.lookup(&k);
    if (!v)
        return SK_PASS;
    u32 lkey = ((u32)k.family << 16) | v->port;
    mbr_tw.delete(&k);
    struct bpf_sock *sk = (struct bpf_sock *)mbr_listen.lookup(&lkey);
    if (!sk)
        return SK_PASS;
    bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return SK_PASS;
}
