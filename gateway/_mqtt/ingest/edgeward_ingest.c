/*
 * edgeward_ingest: a per-device ingest limit inside the managed Mosquitto broker.
 *
 * Loaded on the devices' listener only (per_listener_settings). Every publication a device
 * makes that its ACL allows spends one token of its bucket: one bucket for its frames
 * (topics ending in "/frames"), one for everything else (telemetry). A publication that
 * finds its bucket empty is refused by the broker itself: an MQTT 5 QoS 1 sender gets
 * PUBACK 0x87 (the one refusal code Mosquitto 2.0 lets a plugin give), a QoS 0 one is
 * dropped, and the message never reaches the gateway's bridge. So a device that floods,
 * however often it reconnects, costs the broker its TLS and parsing only and never queues
 * in front of other devices' messages on the way to the gateway.
 *
 * Buckets are kept per client id, which on the devices' listener is the certificate's CN
 * (use_username_as_clientid): a reconnect does not refill them. The gateway's own front door
 * still applies the device's real budget to what gets through; this limit is set above it
 * (by default twice it) so that only a flood meets it.
 *
 * Refusals are reported, not logged one by one: at the first refusal and then at most once
 * per report interval per device (counts still pending when their interval is over are
 * reported with the next message or disconnect of any device; and when it disconnects, or the
 * broker stops), one NOTICE line
 *
 *     edgeward-ingest: refused <client id> frames=<n> other=<n>
 *
 * which the gateway reads from the broker's log into its metrics and audit log.
 *
 * A device refused disconnect_after messages within one second is flooding, not a little
 * over its budget: the broker ends its connection there and then (logged as an administrative
 * action, and reported with " disconnected" appended), so its flood stops costing even the
 * broker's reading until it reconnects, and a reconnect does not refill its buckets.
 *
 * Options (plugin_opt_*): frames_per_s, frames_burst, messages_per_s, messages_burst,
 * report_s, max_clients, disconnect_after (0: never). A missing or invalid option stops the
 * broker at start.
 *
 * Memory is bounded: at most max_clients devices are tracked; when the table is full, devices
 * whose buckets are full again and whose refusals are reported are forgotten (they lose nothing
 * by it). A device that finds every tracked one busy is not limited here (the gateway's front
 * door still applies its budget), and the broker says so on its log at most once per report
 * interval:
 *
 *     edgeward-ingest: tracking <max_clients> devices (max_clients), <n> messages of others not limited
 *
 * A pass over a full table that frees little is not repeated within a second, so messages of
 * devices not tracked cost no more than a lookup.
 */

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define KIND_FRAMES 0
#define KIND_OTHER 1

/* Small, so that a few devices cost little; the table doubles as devices arrive. */
#define INITIAL_CAPACITY 64
#define SWEEP_BACKOFF_NS 1000000000

struct bucket {
	double tokens;
	int64_t at_ns;
};

struct entry {
	char *id;                 /* NULL: empty slot */
	uint64_t hash;
	struct bucket bucket[2];
	uint64_t refused[2];      /* refused since the last report */
	int64_t reported_ns;      /* when the last report was written (0: never) */
	int64_t window_ns;        /* when the current second of refusals began */
	uint32_t window_refused;  /* refusals within it */
};

struct limiter {
	mosquitto_plugin_id_t *pid;
	double rate[2];
	double burst[2];
	int64_t report_ns;
	uint32_t disconnect_after; /* refusals within a second that end the connection; 0: never */
	size_t max_clients;
	struct entry *slots;
	size_t capacity;          /* a power of two, at least twice used */
	size_t used;
	int64_t sweep_ns;         /* no pass over a full table for idle devices before this */
	int64_t due_ns;           /* the earliest a pending refusal count is due (0: none) */
	uint64_t untracked;       /* messages of devices not tracked since the last warning */
	int64_t untracked_ns;     /* when that warning was last written (0: never) */
};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t hash_id(const char *s)
{
	/* FNV-1a: client ids are certificate CNs from our own CA, not attacker-chosen keys. */
	uint64_t h = 1469598103934665603ULL;
	for(; *s; s++){
		h ^= (unsigned char)*s;
		h *= 1099511628211ULL;
	}
	return h;
}

static void refill(const struct limiter *lim, struct bucket *b, int kind, int64_t now)
{
	double elapsed = (double)(now - b->at_ns) / 1e9;
	if(elapsed > 0){
		b->tokens += elapsed * lim->rate[kind];
		if(b->tokens > lim->burst[kind]) b->tokens = lim->burst[kind];
	}
	b->at_ns = now;
}

static bool idle(const struct limiter *lim, struct entry *e, int64_t now)
{
	int kind;
	if(e->refused[KIND_FRAMES] || e->refused[KIND_OTHER]) return false;
	for(kind = 0; kind < 2; kind++){
		refill(lim, &e->bucket[kind], kind, now);
		if(e->bucket[kind].tokens < lim->burst[kind]) return false;
	}
	return true;
}

static struct entry *probe(struct entry *slots, size_t capacity, const char *id, uint64_t h)
{
	size_t i = (size_t)h & (capacity - 1);
	for(;;){
		struct entry *e = &slots[i];
		if(e->id == NULL) return e;
		if(e->hash == h && strcmp(e->id, id) == 0) return e;
		i = (i + 1) & (capacity - 1);
	}
}

/* Rebuild the table at new_capacity, leaving out idle entries when drop_idle is set. */
static int rebuild(struct limiter *lim, size_t new_capacity, bool drop_idle, int64_t now)
{
	struct entry *slots = calloc(new_capacity, sizeof(struct entry));
	size_t i, used = 0;
	if(slots == NULL) return MOSQ_ERR_NOMEM;
	for(i = 0; i < lim->capacity; i++){
		struct entry *e = &lim->slots[i];
		if(e->id == NULL) continue;
		if(drop_idle && idle(lim, e, now)){
			free(e->id);
			continue;
		}
		*probe(slots, new_capacity, e->id, e->hash) = *e;
		used++;
	}
	free(lim->slots);
	lim->slots = slots;
	lim->capacity = new_capacity;
	lim->used = used;
	return MOSQ_ERR_SUCCESS;
}

static size_t count_idle(const struct limiter *lim, int64_t now)
{
	size_t i, n = 0;
	for(i = 0; i < lim->capacity; i++){
		if(lim->slots[i].id != NULL && idle(lim, &lim->slots[i], now)) n++;
	}
	return n;
}

static struct entry *lookup(struct limiter *lim, const char *id, int64_t now)
{
	uint64_t h = hash_id(id);
	struct entry *e = probe(lim->slots, lim->capacity, id, h);
	size_t freed;
	int kind;

	if(e->id != NULL) return e;
	if(lim->used >= lim->max_clients){
		/* Full: forget the idle devices. A pass that frees little is not repeated for a
		 * while, so a device not tracked costs one lookup per message, not a pass. */
		if(now < lim->sweep_ns) return NULL;
		freed = count_idle(lim, now);
		if(freed < lim->max_clients / 8 + 1) lim->sweep_ns = now + SWEEP_BACKOFF_NS;
		if(freed == 0 || rebuild(lim, lim->capacity, true, now) != MOSQ_ERR_SUCCESS) return NULL;
		e = probe(lim->slots, lim->capacity, id, h);
	}
	if(2 * (lim->used + 1) > lim->capacity){
		/* Keep the table at most half full, so that a probe always ends at an empty slot. */
		if(rebuild(lim, lim->capacity * 2, false, now) != MOSQ_ERR_SUCCESS) return NULL;
		e = probe(lim->slots, lim->capacity, id, h);
	}
	e->id = strdup(id);
	if(e->id == NULL) return NULL;
	e->hash = h;
	for(kind = 0; kind < 2; kind++){
		e->bucket[kind].tokens = lim->burst[kind];
		e->bucket[kind].at_ns = now;
		e->refused[kind] = 0;
	}
	e->reported_ns = 0;
	e->window_ns = now;
	e->window_refused = 0;
	lim->used++;
	return e;
}

static void untracked(struct limiter *lim, int64_t now)
{
	lim->untracked++;
	if(lim->untracked_ns == 0 || now - lim->untracked_ns >= lim->report_ns){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "edgeward-ingest: tracking %zu devices (max_clients), "
				"%llu messages of others not limited", lim->used, (unsigned long long)lim->untracked);
		lim->untracked = 0;
		lim->untracked_ns = now;
	}
}

static void report(struct entry *e, int64_t now, bool disconnected)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "edgeward-ingest: refused %s frames=%llu other=%llu%s",
			e->id, (unsigned long long)e->refused[KIND_FRAMES],
			(unsigned long long)e->refused[KIND_OTHER], disconnected ? " disconnected" : "");
	e->refused[KIND_FRAMES] = 0;
	e->refused[KIND_OTHER] = 0;
	e->reported_ns = now;
}

/* A refusal of e is counted but not reported yet: make sure a sweep reports it when due. */
static void mark_pending(struct limiter *lim, const struct entry *e)
{
	int64_t due = e->reported_ns + lim->report_ns;
	if(lim->due_ns == 0 || due < lim->due_ns) lim->due_ns = due;
}

/* Report every device whose pending refusals are due, whoever's message brought the broker
 * here: a device that floods and then goes quiet, still connected, is reported within about
 * a report interval while anyone else publishes. At most four passes per interval. */
static void sweep_due(struct limiter *lim, int64_t now)
{
	size_t i;
	int64_t next = 0;
	if(lim->due_ns == 0 || now < lim->due_ns) return;
	for(i = 0; i < lim->capacity; i++){
		struct entry *e = &lim->slots[i];
		int64_t due;
		if(e->id == NULL || !(e->refused[KIND_FRAMES] || e->refused[KIND_OTHER])) continue;
		due = e->reported_ns + lim->report_ns;
		if(due <= now){
			report(e, now, false);
		}else if(next == 0 || due < next){
			next = due;
		}
	}
	if(next != 0 && next < now + lim->report_ns / 4) next = now + lim->report_ns / 4;
	lim->due_ns = next;
}

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);
	return n >= m && memcmp(s + n - m, suffix, m) == 0;
}

static int on_message(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_message *ed = event_data;
	struct limiter *lim = userdata;
	const char *id;
	struct entry *e;
	struct bucket *b;
	int64_t now;
	int kind;

	(void)event;
	id = mosquitto_client_id(ed->client);
	if(id == NULL || ed->topic == NULL) return MOSQ_ERR_SUCCESS;
	now = now_ns();
	sweep_due(lim, now);
	e = lookup(lim, id, now);
	if(e == NULL){
		untracked(lim, now);
		return MOSQ_ERR_SUCCESS;
	}
	kind = ends_with(ed->topic, "/frames") ? KIND_FRAMES : KIND_OTHER;
	b = &e->bucket[kind];
	refill(lim, b, kind, now);
	if(b->tokens >= 1.0){
		b->tokens -= 1.0;
		if((e->refused[KIND_FRAMES] || e->refused[KIND_OTHER])
				&& now - e->reported_ns >= lim->report_ns){
			report(e, now, false);
		}
		return MOSQ_ERR_SUCCESS;
	}
	e->refused[kind]++;
	if(now - e->window_ns >= 1000000000){
		e->window_ns = now;
		e->window_refused = 0;
	}
	e->window_refused++;
	if(lim->disconnect_after && e->window_refused >= lim->disconnect_after){
		/* A flood, not a device a little over its budget: the broker's error path ends the
		 * connection (logged as an administrative action), so what the device sends next
		 * costs a new handshake, and its bucket is not refilled by it. */
		e->window_refused = 0;
		report(e, now, true);
		return MOSQ_ERR_ADMINISTRATIVE_ACTION;
	}
	if(e->reported_ns == 0 || now - e->reported_ns >= lim->report_ns){
		report(e, now, false);
	}else{
		mark_pending(lim, e);
	}
	return MOSQ_ERR_ACL_DENIED;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	struct limiter *lim = userdata;
	const char *id;
	struct entry *e;

	(void)event;
	sweep_due(lim, now_ns());
	id = mosquitto_client_id(ed->client);
	if(id == NULL) return MOSQ_ERR_SUCCESS;
	e = probe(lim->slots, lim->capacity, id, hash_id(id));
	if(e->id != NULL && (e->refused[KIND_FRAMES] || e->refused[KIND_OTHER])){
		report(e, now_ns(), false);
	}
	return MOSQ_ERR_SUCCESS;
}

static int parse_number(const char *key, const char *value, double min, double max, double *out)
{
	char *end = NULL;
	double v;
	errno = 0;
	v = strtod(value, &end);
	if(errno != 0 || end == value || *end != '\0' || !isfinite(v) || v < min || v > max){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"edgeward-ingest: plugin_opt_%s must be a number from %g to %g", key, min, max);
		return MOSQ_ERR_INVAL;
	}
	*out = v;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	struct limiter *lim;
	double report_s = 1.0, max_clients = 1048576.0, disconnect_after = 0;
	bool seen[4] = {false, false, false, false};
	int i, rc;

	lim = calloc(1, sizeof(*lim));
	if(lim == NULL) return MOSQ_ERR_NOMEM;
	for(i = 0; i < option_count; i++){
		const char *key = options[i].key, *value = options[i].value;
		if(value == NULL){
			rc = MOSQ_ERR_INVAL;
		}else if(!strcmp(key, "frames_per_s")){
			rc = parse_number(key, value, 0.001, 1e6, &lim->rate[KIND_FRAMES]);
			seen[0] = true;
		}else if(!strcmp(key, "frames_burst")){
			rc = parse_number(key, value, 1, 1e6, &lim->burst[KIND_FRAMES]);
			seen[1] = true;
		}else if(!strcmp(key, "messages_per_s")){
			rc = parse_number(key, value, 0.001, 1e6, &lim->rate[KIND_OTHER]);
			seen[2] = true;
		}else if(!strcmp(key, "messages_burst")){
			rc = parse_number(key, value, 1, 1e6, &lim->burst[KIND_OTHER]);
			seen[3] = true;
		}else if(!strcmp(key, "report_s")){
			rc = parse_number(key, value, 0.01, 3600, &report_s);
		}else if(!strcmp(key, "max_clients")){
			rc = parse_number(key, value, 16, 1e8, &max_clients);
		}else if(!strcmp(key, "disconnect_after")){
			rc = parse_number(key, value, 0, 1e6, &disconnect_after);
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "edgeward-ingest: unknown option plugin_opt_%s", key);
			rc = MOSQ_ERR_INVAL;
		}
		if(rc != MOSQ_ERR_SUCCESS){
			free(lim);
			return rc;
		}
	}
	for(i = 0; i < 4; i++){
		if(!seen[i]){
			mosquitto_log_printf(MOSQ_LOG_ERR, "edgeward-ingest: plugin_opt_frames_per_s, "
					"frames_burst, messages_per_s and messages_burst are required");
			free(lim);
			return MOSQ_ERR_INVAL;
		}
	}
	lim->report_ns = (int64_t)(report_s * 1e9);
	lim->max_clients = (size_t)max_clients;
	lim->disconnect_after = (uint32_t)disconnect_after;
	lim->capacity = INITIAL_CAPACITY;
	lim->slots = calloc(lim->capacity, sizeof(struct entry));
	if(lim->slots == NULL){
		free(lim);
		return MOSQ_ERR_NOMEM;
	}
	lim->pid = identifier;
	*userdata = lim;
	rc = mosquitto_callback_register(identifier, MOSQ_EVT_MESSAGE, on_message, NULL, lim);
	if(rc == MOSQ_ERR_SUCCESS){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, lim);
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_callback_unregister(identifier, MOSQ_EVT_MESSAGE, on_message, NULL);
		}
	}
	if(rc != MOSQ_ERR_SUCCESS){
		free(lim->slots);
		free(lim);
		*userdata = NULL;
		return rc;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO,
			"edgeward-ingest: frames %g/s burst %g, other messages %g/s burst %g per device; "
			"disconnected after %u refusals within a second (0: never)",
			lim->rate[KIND_FRAMES], lim->burst[KIND_FRAMES], lim->rate[KIND_OTHER],
			lim->burst[KIND_OTHER], lim->disconnect_after);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct limiter *lim = userdata;
	int64_t now = now_ns();
	size_t i;

	(void)options;
	(void)option_count;
	if(lim == NULL) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(lim->pid, MOSQ_EVT_MESSAGE, on_message, NULL);
	mosquitto_callback_unregister(lim->pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	for(i = 0; i < lim->capacity; i++){
		struct entry *e = &lim->slots[i];
		/* The broker stops without a disconnect event for the devices still connected:
		 * what they had refused since their last report is reported now. */
		if(e->id != NULL && (e->refused[KIND_FRAMES] || e->refused[KIND_OTHER])){
			report(e, now, false);
		}
		free(e->id);
	}
	free(lim->slots);
	free(lim);
	return MOSQ_ERR_SUCCESS;
}
