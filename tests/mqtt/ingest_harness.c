/*
 * A harness for the broker's ingest limit plugin (gateway/_mqtt/ingest/edgeward_ingest.c).
 *
 * The plugin's source is compiled into this program (PLUGIN_SOURCE) with the few broker
 * functions it calls stubbed, its clock and its calloc under the harness's control, so that
 * what a test against the broker cannot see is checked directly, after every message: the
 * table is a power of two, at most half full and never above max_clients, every device is
 * found where a probe looks for it, a message of a device not tracked costs no allocation,
 * and every refusal is reported exactly once through growth, eviction and disconnects.
 * tests/mqtt/test_ingest_limit.py builds it with AddressSanitizer and
 * UndefinedBehaviorSanitizer where the compiler has them.
 *
 * Usage: ingest_harness [scenario...] (growth, full, no_id, churn; all when none is named).
 * Exit status 0 and "ok" when every check holds; otherwise the failed check and status 1.
 */

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int64_t fake_ns = 1000000000;
static size_t callocs;
static uint64_t reported;  /* refusals in report lines */
static size_t warnings;    /* lines about devices not tracked */

static void *counting_calloc(size_t n, size_t size)
{
	callocs++;
	return calloc(n, size);
}

static int fake_clock(clockid_t clock, struct timespec *ts)
{
	(void)clock;
	ts->tv_sec = (time_t)(fake_ns / 1000000000);
	ts->tv_nsec = (long)(fake_ns % 1000000000);
	return 0;
}

#define calloc counting_calloc
#define clock_gettime fake_clock
#include PLUGIN_SOURCE
#undef calloc
#undef clock_gettime

#define CHECK(cond) do{ \
		if(!(cond)){ \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
			exit(1); \
		} \
	}while(0)

/* The broker's side, as far as the plugin uses it; a client is its id. */

const char *mosquitto_client_id(const struct mosquitto *client)
{
	return (const char *)client;
}

void mosquitto_log_printf(int level, const char *fmt, ...)
{
	char line[4096];
	unsigned long long frames, other;
	const char *counts;
	va_list ap;

	(void)level;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	counts = strstr(line, " frames=");
	if(!strncmp(line, "edgeward-ingest: refused ", 25) && counts != NULL
			&& sscanf(counts, " frames=%llu other=%llu", &frames, &other) == 2){
		reported += frames + other;
	}
	if(strstr(line, "not limited") != NULL) warnings++;
}

int mosquitto_callback_register(mosquitto_plugin_id_t *identifier, int event,
		MOSQ_FUNC_generic_callback cb_func, const void *event_data, void *userdata)
{
	(void)identifier; (void)event; (void)cb_func; (void)event_data; (void)userdata;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_callback_unregister(mosquitto_plugin_id_t *identifier, int event,
		MOSQ_FUNC_generic_callback cb_func, const void *event_data)
{
	(void)identifier; (void)event; (void)cb_func; (void)event_data;
	return MOSQ_ERR_SUCCESS;
}

/* Buckets of 2 refilled at per_s a second (frames and other messages alike). */
static struct limiter *start(char *max_clients, char *per_s, char *disconnect_after)
{
	struct mosquitto_opt opts[] = {
		{"frames_per_s", per_s}, {"frames_burst", "2"},
		{"messages_per_s", per_s}, {"messages_burst", "2"},
		{"max_clients", max_clients}, {"report_s", "1"}, {"disconnect_after", disconnect_after},
	};
	void *userdata = NULL;
	CHECK(mosquitto_plugin_init(NULL, &userdata, opts, 7) == MOSQ_ERR_SUCCESS);
	reported = 0;
	warnings = 0;
	return userdata;
}

static void stop(struct limiter *lim)
{
	CHECK(mosquitto_plugin_cleanup(lim, NULL, 0) == MOSQ_ERR_SUCCESS);
}

static int publish(struct limiter *lim, char *id, const char *kind)
{
	char topic[300];
	struct mosquitto_evt_message ed;

	memset(&ed, 0, sizeof(ed));
	snprintf(topic, sizeof(topic), "devices/%s/%s", id != NULL ? id : "-", kind);
	ed.client = (struct mosquitto *)id;
	ed.topic = topic;
	return on_message(MOSQ_EVT_MESSAGE, &ed, lim);
}

static void disconnect(struct limiter *lim, char *id)
{
	struct mosquitto_evt_disconnect ed;

	memset(&ed, 0, sizeof(ed));
	ed.client = (struct mosquitto *)id;
	CHECK(on_disconnect(MOSQ_EVT_DISCONNECT, &ed, lim) == MOSQ_ERR_SUCCESS);
}

static void check_table(const struct limiter *lim)
{
	size_t i, n = 0;

	CHECK(lim->capacity > 0 && (lim->capacity & (lim->capacity - 1)) == 0);
	CHECK(2 * lim->used <= lim->capacity);
	CHECK(lim->used <= lim->max_clients);
	for(i = 0; i < lim->capacity; i++){
		const struct entry *e = &lim->slots[i];
		if(e->id == NULL) continue;
		n++;
		CHECK(e->hash == hash_id(e->id));
		CHECK(probe(lim->slots, lim->capacity, e->id, e->hash) == e);
	}
	CHECK(n == lim->used);
}

static uint64_t pending(const struct limiter *lim)
{
	size_t i;
	uint64_t n = 0;
	for(i = 0; i < lim->capacity; i++){
		if(lim->slots[i].id != NULL) n += lim->slots[i].refused[0] + lim->slots[i].refused[1];
	}
	return n;
}

/* Thousands of devices at once: each keeps its buckets through every growth. */
static void growth(void)
{
	enum { DEVICES = 3000 };
	static char ids[DEVICES][24];
	struct limiter *lim = start("1e8", "0.001", "0");
	int i;

	CHECK(lim->capacity == 64);
	for(i = 0; i < DEVICES; i++){
		snprintf(ids[i], sizeof(ids[i]), "dev-%05d", i);
		CHECK(publish(lim, ids[i], "frames") == MOSQ_ERR_SUCCESS);
		CHECK(publish(lim, ids[i], "frames") == MOSQ_ERR_SUCCESS);
		CHECK(publish(lim, ids[i], "frames") == MOSQ_ERR_ACL_DENIED);
		if(i % 97 == 0) check_table(lim);
	}
	check_table(lim);
	CHECK(lim->used == DEVICES && lim->capacity == 8192);
	for(i = 0; i < DEVICES; i++){
		CHECK(publish(lim, ids[i], "frames") == MOSQ_ERR_ACL_DENIED);
		CHECK(publish(lim, ids[i], "telemetry") == MOSQ_ERR_SUCCESS);
		disconnect(lim, ids[i]);
	}
	CHECK(reported == 2 * DEVICES && pending(lim) == 0);
	stop(lim);
}

/* max_clients busy devices: a new one is not tracked, and its messages cost no allocation
 * (no pass over the table per message); once the busy ones are idle, it is. */
static void full(void)
{
	static char ids[16][24];
	char extra[] = "dev-extra", later[] = "dev-later";
	struct limiter *lim = start("16", "0.001", "0");
	size_t before;
	int i;

	for(i = 0; i < 16; i++){
		snprintf(ids[i], sizeof(ids[i]), "busy-%02d", i);
		CHECK(publish(lim, ids[i], "frames") == MOSQ_ERR_SUCCESS);
	}
	check_table(lim);
	for(i = 0; i < 5; i++){
		CHECK(publish(lim, extra, "frames") == MOSQ_ERR_SUCCESS);
	}
	CHECK(warnings == 1 && lim->used == 16);
	before = callocs;
	for(i = 0; i < 100000; i++){
		fake_ns += 1000;
		CHECK(publish(lim, extra, "frames") == MOSQ_ERR_SUCCESS);
	}
	CHECK(callocs == before);
	check_table(lim);
	/* 2000 s later every busy bucket is full again: the new device gets a place. */
	fake_ns += (int64_t)2001 * 1000000000;
	CHECK(publish(lim, later, "frames") == MOSQ_ERR_SUCCESS);
	CHECK(publish(lim, later, "frames") == MOSQ_ERR_SUCCESS);
	CHECK(publish(lim, later, "frames") == MOSQ_ERR_ACL_DENIED);
	check_table(lim);
	CHECK(lim->used == 1);
	stop(lim);
}

/* A device without a client id is not limited, and nothing breaks. */
static void no_id(void)
{
	struct limiter *lim = start("16", "0.001", "0");
	int i;

	for(i = 0; i < 5; i++){
		CHECK(publish(lim, NULL, "frames") == MOSQ_ERR_SUCCESS);
	}
	disconnect(lim, NULL);
	CHECK(lim->used == 0);
	stop(lim);
}

static uint64_t next_random(uint64_t *state)
{
	*state ^= *state << 13;
	*state ^= *state >> 7;
	*state ^= *state << 17;
	return *state;
}

/* Devices coming and going at random through a small table, some flooding (and disconnected
 * for it), time passing: the table holds, and every refusal is reported exactly once. */
static void churn(void)
{
	enum { DEVICES = 200, STEPS = 300000 };
	static char ids[DEVICES][24];
	struct limiter *lim = start("16", "50", "6");
	char last[] = "dev-last";
	uint64_t state = 0x9e3779b97f4a7c15ULL, refused = 0;
	int i, rc;

	for(i = 0; i < DEVICES; i++){
		snprintf(ids[i], sizeof(ids[i]), "dev-%03d", i);
	}
	for(i = 0; i < STEPS; i++){
		uint64_t r = next_random(&state);
		char *id = ids[(r >> 8) % DEVICES];
		switch(r % 10){
			case 0:
				disconnect(lim, id);
				break;
			case 1:
				fake_ns += (int64_t)((r >> 32) % 100000000);
				break;
			case 2:
				rc = publish(lim, id, "telemetry");
				if(rc != MOSQ_ERR_SUCCESS) refused++;
				break;
			default:
				rc = publish(lim, id, "frames");
				CHECK(rc == MOSQ_ERR_SUCCESS || rc == MOSQ_ERR_ACL_DENIED
						|| rc == MOSQ_ERR_ADMINISTRATIVE_ACTION);
				if(rc != MOSQ_ERR_SUCCESS) refused++;
				break;
		}
		if(i % 16 == 0) check_table(lim);
		CHECK(reported + pending(lim) == refused);
	}
	CHECK(refused > 0 && warnings > 0);
	/* A device with a refusal not yet reported (its first one is reported at once). */
	fake_ns += (int64_t)10 * 1000000000;
	for(i = 0; i < 4; i++){
		if(publish(lim, last, "frames") != MOSQ_ERR_SUCCESS) refused++;
	}
	CHECK(pending(lim) == 1);
	/* The broker stops with devices connected: what they had pending is reported then. */
	stop(lim);
	CHECK(reported == refused);
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		void (*run)(void);
	} scenarios[] = {{"growth", growth}, {"full", full}, {"no_id", no_id}, {"churn", churn}};
	size_t i;
	int j;

	/* The scenarios named (all of them when none is). */
	for(i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++){
		bool named = argc < 2;
		for(j = 1; j < argc; j++){
			if(!strcmp(argv[j], scenarios[i].name)) named = true;
		}
		if(named) scenarios[i].run();
	}
	puts("ok");
	return 0;
}
