/*
 * kvm.h - the cffi view of <linux/kvm.h>.
 *
 * Every number and layout here is resolved by the C compiler from the kernel
 * headers: "..." means "ask the compiler", and partial structs ("...;") list
 * only the fields Python touches; cffi checks their offsets and sizes at build
 * time. Nothing below is typed in from a spec.
 */

#define KVM_API_VERSION ...

/* system ioctls */
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...

/* VM ioctls */
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_SIGNAL_MSI ...
#define KVM_CHECK_EXTENSION ...

/* vCPU ioctls */
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_TSC_KHZ ...
#define KVM_SET_GUEST_DEBUG ...

/* capabilities */
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_MAX_VCPUS ...

/* exit reasons */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IOAPIC_EOI ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_RESAMPLE ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_CAP_IOEVENTFD_ANY_LENGTH ...

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    ...;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    ...;
};

struct kvm_msr_entry {
    uint32_t index;
    uint64_t data;
    ...;
};

struct kvm_msrs {
    uint32_t nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
    ...;
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax, ebx, ecx, edx;
    ...;
};

struct kvm_cpuid2 {
    uint32_t nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    ...;
};

struct kvm_irq_level {
    uint32_t irq;
    uint32_t level;
    ...;
};

struct kvm_pit_config {
    uint32_t flags;
    ...;
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    ...;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    ...;
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    ...;
};

struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
    ...;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    ...;
};

typedef union {
    struct kvm_irq_routing_irqchip irqchip;
    struct kvm_irq_routing_msi msi;
    ...;
} kvm_irq_routing_u_t;

struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    kvm_irq_routing_u_t u;
    ...;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
    ...;
};

struct kvm_guest_debug {
    uint32_t control;
    ...;
};

/* The exit-reason union of struct kvm_run is made of anonymous structs; kvm.c
 * names each member's type with __typeof__ so Python can reach its fields. */
typedef struct {
    uint8_t direction;
    uint8_t size;
    uint16_t port;
    uint32_t count;
    uint64_t data_offset;
    ...;
} kvm_exit_io_t;

typedef struct {
    uint64_t phys_addr;
    uint8_t data[8];
    uint32_t len;
    uint8_t is_write;
    ...;
} kvm_exit_mmio_t;

typedef struct {
    uint64_t hardware_entry_failure_reason;
    uint32_t cpu;
    ...;
} kvm_exit_fail_entry_t;

typedef struct {
    uint64_t hardware_exit_reason;
    ...;
} kvm_exit_hw_t;

typedef struct {
    uint32_t suberror;
    uint32_t ndata;
    unsigned long long data[16];
    ...;
} kvm_exit_internal_t;

typedef struct {
    uint32_t type;
    uint32_t ndata;
    unsigned long long data[16];
    ...;
} kvm_exit_system_event_t;

typedef struct {
    uint32_t exception;
    uint32_t error_code;
    ...;
} kvm_exit_ex_t;

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    kvm_exit_hw_t hw;
    kvm_exit_fail_entry_t fail_entry;
    kvm_exit_ex_t ex;
    kvm_exit_io_t io;
    kvm_exit_mmio_t mmio;
    kvm_exit_internal_t internal;
    kvm_exit_system_event_t system_event;
    ...;
};

/* Thin wrappers (kvm.c): ioctl is variadic, which cffi cannot call in API
 * mode with a typed argument; these also release the GIL like every cffi call. */
int pykvm_ioctl(int fd, unsigned long request, void *arg);
int pykvm_ioctl_val(int fd, unsigned long request, unsigned long arg);

/* Install a no-op handler (without SA_RESTART) for the signal that kicks a
 * vCPU thread out of KVM_RUN; returns 0 or -errno. */
int pykvm_install_kick_handler(int signo);
