/* The native reference for MariaDB: how fast the server accepts connections
 * from a C client (libmariadb), C threads at a time, each connection doing what
 * a probe does: connect + authenticate, SELECT 1, close (COM_QUIT).
 *
 *   mariadb_connect HOST PORT USER_PREFIX USERS PASSWORD TOTAL CONCURRENCY
 *
 * Connection i logs in as USER_PREFIX%05d of (i % USERS), as the engine's
 * batches do. Prints one line: "ok failed wall_s p50_ms p99_ms".
 * Build: gcc -O2 -o mariadb_connect mariadb_connect.c $(mariadb_config --cflags --libs) -lpthread
 */
#include <mysql.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *host, *prefix, *password;
static unsigned int port;
static long users, total;
static long next_index = 0, failed = 0;
static double *latencies;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *worker(void *arg) {
    (void)arg;
    mysql_thread_init();
    for (;;) {
        pthread_mutex_lock(&lock);
        long i = next_index++;
        pthread_mutex_unlock(&lock);
        if (i >= total) break;
        char user[64];
        snprintf(user, sizeof user, "%s%05ld", prefix, i % users);
        double t0 = now();
        int ok = 0;
        MYSQL *conn = mysql_init(NULL);
        unsigned int timeout = 10;
        my_bool no_ssl = 0;
        mysql_optionsv(conn, MYSQL_OPT_CONNECT_TIMEOUT, &timeout);
        mysql_optionsv(conn, MYSQL_OPT_SSL_ENFORCE, &no_ssl);
        if (mysql_real_connect(conn, host, user, password, NULL, port, NULL, 0)) {
            if (mysql_query(conn, "SELECT 1") == 0) {
                MYSQL_RES *res = mysql_store_result(conn);
                if (res) {
                    ok = mysql_fetch_row(res) != NULL;
                    mysql_free_result(res);
                }
            }
        }
        mysql_close(conn);
        latencies[i] = (now() - t0) * 1000.0;
        if (!ok) {
            pthread_mutex_lock(&lock);
            failed++;
            pthread_mutex_unlock(&lock);
        }
    }
    mysql_thread_end();
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double q) {
    long k = (long)(q * total + 0.999999999) - 1;
    if (k < 0) k = 0;
    if (k >= total) k = total - 1;
    return latencies[k];
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT USER_PREFIX USERS PASSWORD TOTAL CONCURRENCY\n", argv[0]);
        return 2;
    }
    host = argv[1];
    port = (unsigned int)atoi(argv[2]);
    prefix = argv[3];
    users = atol(argv[4]);
    password = argv[5];
    total = atol(argv[6]);
    long concurrency = atol(argv[7]);
    if (users < 1 || total < 1 || concurrency < 1) return 2;
    latencies = calloc((size_t)total, sizeof(double));
    if (mysql_library_init(0, NULL, NULL)) return 1;
    /* warm-up: one connection */
    MYSQL *w = mysql_init(NULL);
    char user0[64];
    snprintf(user0, sizeof user0, "%s%05d", prefix, 0);
    if (!mysql_real_connect(w, host, user0, password, NULL, port, NULL, 0)) {
        fprintf(stderr, "warm-up connect failed: %s\n", mysql_error(w));
        return 1;
    }
    mysql_close(w);
    pthread_t *threads = calloc((size_t)concurrency, sizeof(pthread_t));
    double t0 = now();
    for (long t = 0; t < concurrency; t++) pthread_create(&threads[t], NULL, worker, NULL);
    for (long t = 0; t < concurrency; t++) pthread_join(threads[t], NULL);
    double wall = now() - t0;
    qsort(latencies, (size_t)total, sizeof(double), cmp);
    printf("%ld %ld %.6f %.3f %.3f\n", total - failed, failed, wall, pct(0.50), pct(0.99));
    mysql_library_end();
    return 0;
}
