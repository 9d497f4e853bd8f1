/* A null libibverbs for measuring pyverbs_kv's own posting cost natively.
 *
 * It exports the libibverbs symbols pyverbs_kv links (with their symbol
 * versions), shows one device "null0" with one active RoCE port, and
 * implements the data path as no-ops: post_send accepts every work request
 * and queues a success completion for each signalled one; poll_cq hands
 * them back. No byte moves. Only bench/post_cost_bench.py loads it, through
 * LD_LIBRARY_PATH in a child process; it is never installed or linked. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <infiniband/verbs.h>

#undef ibv_query_port
#undef ibv_reg_mr

#define RING 65536

struct null_cq {
	struct ibv_cq cq;
	uint64_t ids[RING];
	uint32_t opcodes[RING];
	uint64_t head, tail;
};

static struct ibv_device null_device = { .node_type = IBV_NODE_CA,
					  .transport_type = IBV_TRANSPORT_IB,
					  .name = "null0" };
static struct ibv_device *device_list[2] = { &null_device, NULL };
static uint32_t next_qpn = 0x100;
static uint32_t next_key = 0x1000;

static int null_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr,
			  struct ibv_send_wr **bad_wr)
{
	struct null_cq *cq = (struct null_cq *)qp->send_cq;

	for (; wr; wr = wr->next) {
		if (!(wr->send_flags & IBV_SEND_SIGNALED))
			continue;
		if (cq->tail - cq->head >= RING) {
			*bad_wr = wr;
			return ENOMEM;
		}
		cq->ids[cq->tail % RING] = wr->wr_id;
		cq->opcodes[cq->tail % RING] = wr->opcode == IBV_WR_RDMA_READ ?
			IBV_WC_RDMA_READ : IBV_WC_RDMA_WRITE;
		cq->tail++;
	}
	return 0;
}

static int null_poll_cq(struct ibv_cq *ibcq, int num_entries, struct ibv_wc *wc)
{
	struct null_cq *cq = (struct null_cq *)ibcq;
	int n = 0;

	for (; n < num_entries && cq->head < cq->tail; n++, cq->head++) {
		memset(&wc[n], 0, sizeof(wc[n]));
		wc[n].wr_id = cq->ids[cq->head % RING];
		wc[n].status = IBV_WC_SUCCESS;
		wc[n].opcode = cq->opcodes[cq->head % RING];
	}
	return n;
}

static int null_req_notify_cq(struct ibv_cq *cq, int solicited_only)
{
	return 0;
}

static int null_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr,
			  struct ibv_recv_wr **bad_wr)
{
	return 0;
}

int ibv_fork_init(void) { return 0; }

struct ibv_device **ibv_get_device_list(int *num_devices)
{
	if (num_devices)
		*num_devices = 1;
	return device_list;
}

void ibv_free_device_list(struct ibv_device **list) {}

const char *ibv_get_device_name(struct ibv_device *device) { return device->name; }

struct ibv_context *ibv_open_device(struct ibv_device *device)
{
	struct ibv_context *ctx = calloc(1, sizeof(*ctx));

	if (!ctx)
		return NULL;
	ctx->device = device;
	ctx->ops.post_send = null_post_send;
	ctx->ops.post_recv = null_post_recv;
	ctx->ops.poll_cq = null_poll_cq;
	ctx->ops.req_notify_cq = null_req_notify_cq;
	ctx->num_comp_vectors = 1;
	return ctx;
}

int ibv_close_device(struct ibv_context *ctx)
{
	free(ctx);
	return 0;
}

int ibv_query_device(struct ibv_context *ctx, struct ibv_device_attr *attr)
{
	memset(attr, 0, sizeof(*attr));
	attr->max_qp_wr = 32768;
	attr->max_sge = 32;
	attr->max_cqe = 1 << 20;
	attr->max_mr_size = UINT64_MAX;
	attr->max_qp = 1024;
	attr->max_cq = 1024;
	attr->max_mr = 1 << 20;
	attr->max_pd = 1024;
	attr->max_qp_rd_atom = 128;
	attr->max_qp_init_rd_atom = 128;
	attr->phys_port_cnt = 1;
	return 0;
}

int ibv_query_port(struct ibv_context *ctx, uint8_t port, struct _compat_ibv_port_attr *attr)
{
	struct ibv_port_attr *a = (struct ibv_port_attr *)attr;

	if (port != 1)
		return EINVAL;
	a->state = IBV_PORT_ACTIVE;
	a->max_mtu = IBV_MTU_4096;
	a->active_mtu = IBV_MTU_1024;
	a->gid_tbl_len = 1;
	a->max_msg_sz = 1U << 31;
	a->link_layer = IBV_LINK_LAYER_ETHERNET;
	return 0;
}

const char *ibv_port_state_str(enum ibv_port_state state)
{
	return state == IBV_PORT_ACTIVE ? "active" : "down";
}

static void null_gid(union ibv_gid *gid)
{
	static const uint8_t mapped[16] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
					    127, 0, 0, 1 };
	memcpy(gid->raw, mapped, sizeof(mapped));
}

int ibv_query_gid(struct ibv_context *ctx, uint8_t port, int index, union ibv_gid *gid)
{
	if (port != 1 || index != 0)
		return EINVAL;
	null_gid(gid);
	return 0;
}

int _ibv_query_gid_ex(struct ibv_context *ctx, uint32_t port, uint32_t index,
		      struct ibv_gid_entry *entry, uint32_t flags, size_t entry_size)
{
	if (port != 1 || index != 0)
		return ENODATA;
	memset(entry, 0, entry_size);
	null_gid(&entry->gid);
	entry->gid_index = 0;
	entry->port_num = 1;
	entry->gid_type = IBV_GID_TYPE_ROCE_V2;
	return 0;
}

struct ibv_pd *ibv_alloc_pd(struct ibv_context *ctx)
{
	struct ibv_pd *pd = calloc(1, sizeof(*pd));

	if (pd)
		pd->context = ctx;
	return pd;
}

int ibv_dealloc_pd(struct ibv_pd *pd)
{
	free(pd);
	return 0;
}

struct ibv_mr *ibv_reg_mr_iova2(struct ibv_pd *pd, void *addr, size_t length,
				uint64_t iova, unsigned int access)
{
	struct ibv_mr *mr = calloc(1, sizeof(*mr));

	if (!mr)
		return NULL;
	mr->context = pd->context;
	mr->pd = pd;
	mr->addr = addr;
	mr->length = length;
	mr->lkey = next_key++;
	mr->rkey = next_key++;
	return mr;
}

int ibv_dereg_mr(struct ibv_mr *mr)
{
	free(mr);
	return 0;
}

struct ibv_comp_channel *ibv_create_comp_channel(struct ibv_context *ctx)
{
	struct ibv_comp_channel *ch = calloc(1, sizeof(*ch));

	if (ch) {
		ch->context = ctx;
		ch->fd = -1;
	}
	return ch;
}

int ibv_destroy_comp_channel(struct ibv_comp_channel *ch)
{
	free(ch);
	return 0;
}

int ibv_get_cq_event(struct ibv_comp_channel *ch, struct ibv_cq **cq, void **cq_context)
{
	errno = EAGAIN;
	return -1;
}

void ibv_ack_cq_events(struct ibv_cq *cq, unsigned int nevents) {}

struct ibv_cq *ibv_create_cq(struct ibv_context *ctx, int cqe, void *cq_context,
			     struct ibv_comp_channel *channel, int comp_vector)
{
	struct null_cq *cq = calloc(1, sizeof(*cq));

	if (!cq)
		return NULL;
	cq->cq.context = ctx;
	cq->cq.channel = channel;
	cq->cq.cq_context = cq_context;
	cq->cq.cqe = cqe;
	return &cq->cq;
}

int ibv_destroy_cq(struct ibv_cq *cq)
{
	free(cq);
	return 0;
}

struct ibv_qp *ibv_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr)
{
	struct ibv_qp *qp = calloc(1, sizeof(*qp));

	if (!qp)
		return NULL;
	qp->context = pd->context;
	qp->pd = pd;
	qp->send_cq = attr->send_cq;
	qp->recv_cq = attr->recv_cq;
	qp->qp_num = next_qpn++;
	qp->qp_type = attr->qp_type;
	qp->state = IBV_QPS_RESET;
	return qp;
}

int ibv_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int mask)
{
	if (mask & IBV_QP_STATE)
		qp->state = attr->qp_state;
	return 0;
}

int ibv_query_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int mask,
		 struct ibv_qp_init_attr *init)
{
	memset(attr, 0, sizeof(*attr));
	memset(init, 0, sizeof(*init));
	attr->qp_state = qp->state;
	init->send_cq = qp->send_cq;
	init->recv_cq = qp->recv_cq;
	init->qp_type = qp->qp_type;
	return 0;
}

int ibv_destroy_qp(struct ibv_qp *qp)
{
	free(qp);
	return 0;
}

const char *ibv_wc_status_str(enum ibv_wc_status status)
{
	return status == IBV_WC_SUCCESS ? "success" : "error";
}
