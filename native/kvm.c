/*
 * kvm.c - C side of kvm.h: names for the anonymous members of struct
 * kvm_run's exit union, and the ioctl and signal wrappers.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

typedef __typeof__(((struct kvm_run *)0)->io) kvm_exit_io_t;
typedef __typeof__(((struct kvm_run *)0)->mmio) kvm_exit_mmio_t;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) kvm_exit_fail_entry_t;
typedef __typeof__(((struct kvm_run *)0)->hw) kvm_exit_hw_t;
typedef __typeof__(((struct kvm_run *)0)->internal) kvm_exit_internal_t;
typedef __typeof__(((struct kvm_run *)0)->system_event) kvm_exit_system_event_t;
typedef __typeof__(((struct kvm_run *)0)->ex) kvm_exit_ex_t;
typedef __typeof__(((struct kvm_irq_routing_entry *)0)->u) kvm_irq_routing_u_t;

static int pykvm_ioctl(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg);
}

static int pykvm_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    return ioctl(fd, request, arg);
}

static void pykvm_kick_handler(int signo)
{
    (void)signo;   /* only here to interrupt KVM_RUN with EINTR */
}

static int pykvm_install_kick_handler(int signo)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = pykvm_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;            /* no SA_RESTART: KVM_RUN must return EINTR */
    if (sigaction(signo, &sa, NULL) < 0)
        return -errno;
    return 0;
}
