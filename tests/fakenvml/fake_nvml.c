/*
 * A fake NVML (libnvidia-ml.so.1) for tests. It implements just the entry points whisperd's
 * probe reaches through pynvml, and answers from a text file named by $FAKE_NVML_STATE, re-read
 * on every call so a test can change the "hardware" under a running process.
 *
 * State file: optional header lines whose first key is one of init_fail, count_fail, driver;
 * then one line per GPU of whitespace-separated key=value pairs:
 *   init_fail=1                 nvmlInit* fails with NVML_ERROR_DRIVER_NOT_LOADED
 *   count_fail=1                nvmlDeviceGetCount_v2 fails with NVML_ERROR_UNKNOWN
 *   driver=550.54.15            what nvmlSystemGetDriverVersion reports
 *   name=NVIDIA-H200 uuid=GPU-0 total=150000000000 used=1000000000 util=35 mem_util=10
 *       temp=45 power_mw=120000 fail=0
 * fail=1 makes every per-device call for that GPU return NVML_ERROR_GPU_IS_LOST;
 * power_mw=na makes nvmlDeviceGetPowerUsage return NVML_ERROR_NOT_SUPPORTED.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_UNKNOWN 999

#define MAX_GPUS 16

struct gpu {
    char name[96], uuid[96];
    unsigned long long total, used;
    unsigned util, mem_util, temp, power_mw;
    int fail, no_power;
};

struct state {
    int init_fail, count_fail, count;
    char driver[80];
    struct gpu gpus[MAX_GPUS];
};

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned gpu, memory; } nvmlUtilization_t;

/* A handle points at one of these; the slot holds the GPU's index. */
static int handles[MAX_GPUS];
static int init_count;

static void set_gpu_field(struct gpu *g, const char *key, const char *val) {
    if (!strcmp(key, "name")) snprintf(g->name, sizeof g->name, "%s", val);
    else if (!strcmp(key, "uuid")) snprintf(g->uuid, sizeof g->uuid, "%s", val);
    else if (!strcmp(key, "total")) g->total = strtoull(val, NULL, 10);
    else if (!strcmp(key, "used")) g->used = strtoull(val, NULL, 10);
    else if (!strcmp(key, "util")) g->util = (unsigned)strtoul(val, NULL, 10);
    else if (!strcmp(key, "mem_util")) g->mem_util = (unsigned)strtoul(val, NULL, 10);
    else if (!strcmp(key, "temp")) g->temp = (unsigned)strtoul(val, NULL, 10);
    else if (!strcmp(key, "power_mw") && !strcmp(val, "na")) g->no_power = 1;
    else if (!strcmp(key, "power_mw")) g->power_mw = (unsigned)strtoul(val, NULL, 10);
    else if (!strcmp(key, "fail")) g->fail = atoi(val);
}

/* Parse $FAKE_NVML_STATE into *s. Returns 0, or -1 when the file cannot be read. */
static int load_state(struct state *s) {
    char line[1024];
    const char *path = getenv("FAKE_NVML_STATE");
    FILE *f = path ? fopen(path, "r") : NULL;
    memset(s, 0, sizeof *s);
    snprintf(s->driver, sizeof s->driver, "%s", "999.99.fake");
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        char *save = NULL, *tok = strtok_r(line, " \t\r\n", &save);
        struct gpu *g = NULL;
        if (!tok) continue;
        for (; tok; tok = strtok_r(NULL, " \t\r\n", &save)) {
            char *eq = strchr(tok, '=');
            if (!eq) continue;
            *eq = '\0';
            if (!g && !strcmp(tok, "init_fail")) s->init_fail = atoi(eq + 1);
            else if (!g && !strcmp(tok, "count_fail")) s->count_fail = atoi(eq + 1);
            else if (!g && !strcmp(tok, "driver")) snprintf(s->driver, sizeof s->driver, "%s", eq + 1);
            else {
                if (!g) {
                    if (s->count == MAX_GPUS) break;
                    g = &s->gpus[s->count++];
                }
                set_gpu_field(g, tok, eq + 1);
            }
        }
    }
    fclose(f);
    return 0;
}

static nvmlReturn_t copy_string(const char *src, char *dst, unsigned length) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

/* Resolve a handle against fresh state: *out is that GPU, or an error code comes back. */
static nvmlReturn_t lookup(const void *handle, struct state *s, struct gpu **out) {
    const int *slot = handle;
    if (!init_count) return NVML_ERROR_UNINITIALIZED;
    if (!slot || slot < handles || slot >= handles + MAX_GPUS) return NVML_ERROR_INVALID_ARGUMENT;
    if (load_state(s) != 0) return NVML_ERROR_UNKNOWN;
    if (*slot >= s->count) return NVML_ERROR_GPU_IS_LOST; /* the GPU left the state file */
    *out = &s->gpus[*slot];
    return (*out)->fail ? NVML_ERROR_GPU_IS_LOST : NVML_SUCCESS;
}

#define DEVICE_CALL(handle)                      \
    struct state s;                              \
    struct gpu *g = NULL;                        \
    nvmlReturn_t rc = lookup((handle), &s, &g);  \
    if (rc != NVML_SUCCESS) return rc

nvmlReturn_t nvmlInitWithFlags(unsigned flags) {
    struct state s;
    (void)flags;
    if (load_state(&s) != 0 || s.init_fail) return NVML_ERROR_DRIVER_NOT_LOADED;
    init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (!init_count) return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned length) {
    struct state s;
    if (!init_count) return NVML_ERROR_UNINITIALIZED;
    if (load_state(&s) != 0) return NVML_ERROR_UNKNOWN;
    return copy_string(s.driver, version, length);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) {
    struct state s;
    if (!init_count) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (load_state(&s) != 0 || s.count_fail) return NVML_ERROR_UNKNOWN;
    *count = (unsigned)s.count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, void **device) {
    struct state s;
    if (!init_count) return NVML_ERROR_UNINITIALIZED;
    if (!device) return NVML_ERROR_INVALID_ARGUMENT;
    if (load_state(&s) != 0) return NVML_ERROR_UNKNOWN;
    if (index >= (unsigned)s.count) return NVML_ERROR_INVALID_ARGUMENT;
    if (s.gpus[index].fail) return NVML_ERROR_GPU_IS_LOST;
    handles[index] = (int)index;
    *device = &handles[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(void *device, char *name, unsigned length) {
    DEVICE_CALL(device);
    return copy_string(g->name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(void *device, char *uuid, unsigned length) {
    DEVICE_CALL(device);
    return copy_string(g->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(void *device, nvmlMemory_t *memory) {
    DEVICE_CALL(device);
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = g->total;
    memory->used = g->used;
    memory->free = g->total > g->used ? g->total - g->used : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *device, nvmlMemory_v2_t *memory) {
    DEVICE_CALL(device);
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = g->total;
    memory->reserved = 0;
    memory->used = g->used;
    memory->free = g->total > g->used ? g->total - g->used : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(void *device, nvmlUtilization_t *utilization) {
    DEVICE_CALL(device);
    if (!utilization) return NVML_ERROR_INVALID_ARGUMENT;
    utilization->gpu = g->util;
    utilization->memory = g->mem_util;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(void *device, int sensor, unsigned *temp) {
    DEVICE_CALL(device);
    if (sensor != 0 || !temp) return NVML_ERROR_INVALID_ARGUMENT; /* only NVML_TEMPERATURE_GPU */
    *temp = g->temp;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(void *device, unsigned *power) {
    DEVICE_CALL(device);
    if (!power) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->no_power) return NVML_ERROR_NOT_SUPPORTED;
    *power = g->power_mw;
    return NVML_SUCCESS;
}
